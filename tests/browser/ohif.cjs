// The OHIF Viewer (npm @ohif/app's built dist/) against a real Orthanc, for
// tests/it/viewer.rs. Serves the dist on a free loopback port with a
// single-page-app fallback (every unknown path is index.html), a generated
// app-config.js and a same-origin proxy of /dicom-web/ to Orthanc (Orthanc
// 1.10 sends no CORS headers), then opens each requested view in headless
// Chromium and reports what is on screen. The Rust test asserts on it.
//
// Argument (JSON): { dist, orthanc: "http://127.0.0.1:PORT", out: DIR,
//   views: [{ name, study, series, annotations: bool }] }
// Result: { views: [{ name, url, canvas: {w, h, mean, nonBlack}, svg:
//   {shapes, texts}, text, screenshot, elapsedMs }], errors: [...] }
'use strict';
const fs = require('fs');
const http = require('http');
const path = require('path');
const { launch, run } = require('./web.cjs');

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript',
  '.mjs': 'text/javascript',
  '.css': 'text/css',
  '.json': 'application/json',
  '.wasm': 'application/wasm',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.woff2': 'font/woff2',
  '.ico': 'image/x-icon',
};

function appConfig(origin) {
  const root = `${origin}/dicom-web`;
  return `window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test)',
      name: 'orthanc',
      wadoUriRoot: '${origin}/wado',
      qidoRoot: '${root}',
      wadoRoot: '${root}',
      qidoSupportsIncludeField: false,
      supportsReject: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: { enabled: true },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
`;
}

// Static dist + SPA fallback + /app-config.js + /dicom-web/ and /wado proxy.
function serve(dist, orthanc) {
  const upstream = new URL(orthanc);
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname.startsWith('/dicom-web/') || url.pathname === '/wado') {
      const headers = { ...req.headers, host: upstream.host };
      const up = http.request(
        { host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers },
        (r) => {
          res.writeHead(r.statusCode, r.headers);
          r.pipe(res);
        },
      );
      up.on('error', (e) => {
        res.writeHead(502);
        res.end(String(e));
      });
      req.pipe(up);
      return;
    }
    if (url.pathname === '/app-config.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      res.end(appConfig(`http://${req.headers.host}`));
      return;
    }
    let file = path.join(dist, path.normalize(decodeURIComponent(url.pathname)));
    if (!file.startsWith(dist) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      file = path.join(dist, 'index.html');
    }
    const type = TYPES[path.extname(file)] || 'application/octet-stream';
    res.writeHead(200, { 'content-type': type });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

// In the page: the largest viewport canvas, read back through a 2-D canvas
// (the on-screen canvas may be WebGL), and the SVG annotation layer.
function probe() {
  const canvases = [...document.querySelectorAll('canvas')].filter((c) => c.width > 50 && c.height > 50);
  canvases.sort((a, b) => b.width * b.height - a.width * a.height);
  let canvas = null;
  const c = canvases[0];
  if (c) {
    const copy = document.createElement('canvas');
    copy.width = c.width;
    copy.height = c.height;
    const ctx = copy.getContext('2d');
    ctx.drawImage(c, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let sum = 0;
    let nonBlack = 0;
    for (let i = 0; i < d.length; i += 4) {
      const v = d[i] + d[i + 1] + d[i + 2];
      sum += v / 3;
      if (v > 30) nonBlack += 1;
    }
    const n = d.length / 4;
    canvas = { w: c.width, h: c.height, mean: sum / n, nonBlack: nonBlack / n };
  }
  const svgs = [...document.querySelectorAll('svg.svg-layer, .viewport-element svg, svg')];
  const layer = document.querySelectorAll('svg.svg-layer');
  let shapes = 0;
  const texts = [];
  // The largest shape's box, relative to its layer (0..1): where the region is.
  let region = null;
  for (const s of layer) {
    const frame = s.getBoundingClientRect();
    for (const el of s.querySelectorAll('path, polyline, polygon, ellipse, circle, rect, line')) {
      shapes += 1;
      const b = el.getBoundingClientRect();
      if (!region || b.width * b.height > region.area) {
        region = {
          area: b.width * b.height,
          x0: (b.left - frame.left) / frame.width,
          y0: (b.top - frame.top) / frame.height,
          x1: (b.right - frame.left) / frame.width,
          y1: (b.bottom - frame.top) / frame.height,
        };
      }
    }
    for (const t of s.querySelectorAll('text')) texts.push(t.textContent);
  }
  // The image under the region: mean brightness of the canvas inside its box
  // (the SVG layer and the canvas cover the same viewport element).
  if (canvas && region && c) {
    const x0 = Math.max(0, Math.floor(region.x0 * c.width));
    const y0 = Math.max(0, Math.floor(region.y0 * c.height));
    const x1 = Math.min(c.width, Math.ceil(region.x1 * c.width));
    const y1 = Math.min(c.height, Math.ceil(region.y1 * c.height));
    if (x1 > x0 && y1 > y0) {
      const copy = document.createElement('canvas');
      copy.width = c.width;
      copy.height = c.height;
      const ctx = copy.getContext('2d');
      ctx.drawImage(c, 0, 0);
      const d = ctx.getImageData(x0, y0, x1 - x0, y1 - y0).data;
      let sum = 0;
      for (let i = 0; i < d.length; i += 4) sum += (d[i] + d[i + 1] + d[i + 2]) / 3;
      region.insideMean = sum / (d.length / 4);
    }
  }
  return {
    canvas,
    svg: { layers: layer.length, all: svgs.length, shapes, texts, region },
    text: document.body.innerText,
  };
}

async function main(args) {
  const dist = path.resolve(args.dist);
  const server = await serve(dist, args.orthanc);
  const origin = `http://127.0.0.1:${server.address().port}`;
  const browser = await launch();
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  // A fresh profile shows the onboarding tour: mark it shown.
  await context.addInitScript(() => {
    localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
    window.addEventListener('unhandledrejection', (e) => {
      console.error(`unhandled rejection: ${e.reason && e.reason.stack ? e.reason.stack : e.reason}`);
    });
  });
  const errors = [];
  const views = [];
  for (const v of args.views) {
    const page = await context.newPage();
    page.on('pageerror', (e) => errors.push(`${v.name}: pageerror: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error' || (process.env.OHIF_DEBUG && m.type() !== 'debug')) {
        errors.push(`${v.name}: console ${m.type()}: ${m.text()}`);
      }
    });
    const started = Date.now();
    let url = `${origin}/viewer?StudyInstanceUIDs=${v.study}`;
    if (v.series) url += `&initialSeriesInstanceUID=${v.series}`;
    await page.goto(url, { waitUntil: 'domcontentloaded' });
    // The image: wait for a canvas with content (first image ~5-6 s cold).
    let state = null;
    const deadline = Date.now() + (v.timeoutMs || 90000);
    for (;;) {
      state = await page.evaluate(probe);
      const drawn = state.canvas && state.canvas.nonBlack > 0.01;
      const annotated = !v.annotations || state.svg.shapes > 0;
      if (drawn && annotated) break;
      if (Date.now() > deadline) break;
      await page.waitForTimeout(500);
    }
    // OHIF asks whether to track the SR's measurements (a banner over the
    // viewport): answer No, so the screenshot shows the image, and let late
    // labels settle before reading the final state.
    const no = page.getByRole('button', { name: 'No', exact: true });
    if (await no.count()) await no.first().click();
    await page.waitForTimeout(1500);
    state = await page.evaluate(probe);
    const screenshot = path.join(args.out, `${v.name}.png`);
    await page.screenshot({ path: screenshot });
    views.push({ name: v.name, url, ...state, screenshot, elapsedMs: Date.now() - started });
    await page.close();
  }
  await browser.close();
  server.close();
  return { views, errors };
}

run(main);
