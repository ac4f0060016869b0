// Shared by the browser tests: playwright-core from $HER2MAP_WEB_DEPS
// (scripts/web-deps.sh) driving Debian's /usr/bin/chromium headless, and
// the flags Chromium needs as root in a container (../shared facts:
// STACK.md "Headless Chromium").
'use strict';
const path = require('path');

function playwright() {
  const deps = process.env.HER2MAP_WEB_DEPS;
  if (!deps) {
    throw new Error('HER2MAP_WEB_DEPS is not set: eval "$(scripts/web-deps.sh)"');
  }
  return require(path.join(deps, 'node_modules', 'playwright-core'));
}

async function launch() {
  const { chromium } = playwright();
  return chromium.launch({
    executablePath: process.env.HER2MAP_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

// Run `main(args)` with the JSON argument of argv[2]; print its JSON result
// as the last line of stdout; exit 1 with the error on stderr.
function run(main) {
  const args = JSON.parse(process.argv[2] || '{}');
  main(args).then(
    (result) => {
      process.stdout.write(JSON.stringify(result) + '\n');
      process.exit(0);
    },
    (err) => {
      process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
      process.exit(1);
    },
  );
}

module.exports = { launch, run };
