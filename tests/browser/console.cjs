// The node's console pages in headless Chromium, for tests/it/console_pages.rs:
// sign in through the login form (it sets the session cookie), open the
// dashboard and one case's page, and report their text, the heatmap images'
// natural sizes and screenshots. The Rust test asserts on it.
//
// Argument (JSON): { base: "http://127.0.0.1:PORT", token, caseId, out: DIR }
// Result: { afterLogin, dashboard: {text, screenshot}, case: {state, result,
//   text, images: [{src, naturalWidth, naturalHeight}], screenshot}, errors,
//   failed: [{url, status}] }
'use strict';
const path = require('path');
const { launch, run } = require('./web.cjs');

async function main(args) {
  const browser = await launch();
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  // Failed responses by URL (Chromium's console only says "404").
  const failed = [];
  page.on('response', (r) => {
    if (r.status() >= 400) failed.push({ url: r.url(), status: r.status() });
  });
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) {
      errors.push(`console: ${m.text()}`);
    }
  });

  // Sign in as a person would: the form, then the redirect to the dashboard.
  await page.goto(`${args.base}/login`);
  await page.fill('#token', args.token);
  await Promise.all([page.waitForURL(`${args.base}/`), page.click('#signin')]);
  const afterLogin = page.url();
  await page.waitForSelector('#ready', { timeout: 30000 });
  const dashboard = {
    text: await page.innerText('body'),
    screenshot: path.join(args.out, 'console-dashboard.png'),
  };
  await page.screenshot({ path: dashboard.screenshot, fullPage: true });

  // The case page, once every image has loaded (or failed).
  await page.goto(`${args.base}/cases/${encodeURIComponent(args.caseId)}`);
  await page.waitForSelector('#state', { timeout: 30000 });
  await page.waitForFunction(
    () => [...document.images].every((i) => i.complete),
    null,
    { timeout: 60000 },
  );
  const images = await page.$$eval('img', (imgs) =>
    imgs.map((i) => ({ src: i.getAttribute('src'), naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight })),
  );
  const caseView = {
    state: await page.innerText('#state'),
    result: await page.innerText('#result'),
    text: await page.innerText('body'),
    images,
    screenshot: path.join(args.out, 'console-case.png'),
    top: path.join(args.out, 'console-case-top.png'),
  };
  await page.screenshot({ path: caseView.screenshot, fullPage: true });
  // What fits on one screen (state, result, heatmaps), for the README.
  await page.screenshot({ path: caseView.top });
  await browser.close();
  return { afterLogin, dashboard, case: caseView, errors, failed };
}

run(main);
