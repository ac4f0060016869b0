#!/usr/bin/env bash
# The browser-side peers of the tests, from the npm registry, into one cache
# folder outside the clone (so that a second CI run on the same machine
# starts warm):
#   - playwright-core: drives Debian's /usr/bin/chromium (no browser
#     download); tests/it/console.rs (the console's pages) and
#     tests/it/viewer.rs (OHIF) use it through node;
#   - the OHIF Viewer's built dist/ (@ohif/app 3.13.2), served by
#     tests/it/viewer.rs. `npm install @ohif/app` fails (its dependency
#     @ohif/i18n@3.13.2 is not on the registry), but the package itself
#     ships the built app: `npm pack` and untar it.
# Prints `export HER2MAP_WEB_DEPS=DIR` for eval; idempotent.
set -euo pipefail

DIR="${HER2MAP_WEB_DEPS:-/var/tmp/her2map-web}"
PLAYWRIGHT_VERSION="1.64.1"
OHIF_VERSION="3.13.2"
mkdir -p "$DIR"
cd "$DIR"

if [ ! -f node_modules/playwright-core/package.json ] \
    || ! grep -q "\"version\": \"$PLAYWRIGHT_VERSION\"" node_modules/playwright-core/package.json; then
    [ -f package.json ] || echo '{"name":"her2map-web-deps","private":true}' > package.json
    npm install --silent --no-audit --no-fund "playwright-core@$PLAYWRIGHT_VERSION" >&2
fi

if [ ! -f "ohif-$OHIF_VERSION/dist/index.html" ]; then
    rm -rf "ohif-$OHIF_VERSION.tmp"
    mkdir "ohif-$OHIF_VERSION.tmp"
    npm pack --silent "@ohif/app@$OHIF_VERSION" --pack-destination "ohif-$OHIF_VERSION.tmp" >&2
    tar -xzf "ohif-$OHIF_VERSION.tmp/ohif-app-$OHIF_VERSION.tgz" -C "ohif-$OHIF_VERSION.tmp"
    rm -f "ohif-$OHIF_VERSION.tmp/ohif-app-$OHIF_VERSION.tgz"
    mkdir -p "ohif-$OHIF_VERSION"
    mv "ohif-$OHIF_VERSION.tmp/package/dist" "ohif-$OHIF_VERSION/dist"
    rm -rf "ohif-$OHIF_VERSION.tmp"
fi

echo "export HER2MAP_WEB_DEPS=$DIR"
echo "export HER2MAP_OHIF_DIST=$DIR/ohif-$OHIF_VERSION/dist"
