#!/usr/bin/env bash
# Refresh ui/vendor/ from the versions pinned in ui/package-lock.json (`make ui-vendor`).
# The console has no build step: these files are copied as published, with their licences.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --ignore-scripts --no-audit --no-fund
rm -rf vendor && mkdir -p vendor
cp node_modules/preact/dist/preact.mjs vendor/preact.mjs
cp node_modules/preact/hooks/dist/hooks.mjs vendor/preact-hooks.mjs
cp node_modules/htm/dist/htm.mjs vendor/htm.mjs
cp node_modules/uplot/dist/uPlot.esm.js vendor/uPlot.esm.js
cp node_modules/uplot/dist/uPlot.min.css vendor/uPlot.min.css
# Swagger UI for the API's /docs, served from here so that it works without the internet
cp node_modules/swagger-ui-dist/swagger-ui-bundle.js vendor/swagger-ui-bundle.js
cp node_modules/swagger-ui-dist/swagger-ui.css vendor/swagger-ui.css
cp node_modules/swagger-ui-dist/swagger-ui-bundle.js.LICENSE.txt vendor/
{
  echo "Third-party code of the console, copied unmodified from npm by ui/refresh-vendor.sh."
  echo "Do not edit by hand: change ui/package.json and run \`make ui-vendor\`."
  echo
  for pkg in preact htm uplot swagger-ui-dist; do
    node -e "const p=require('./node_modules/$pkg/package.json');console.log(p.name+' '+p.version+' ('+p.license+')')"
  done
  for pkg in preact htm uplot swagger-ui-dist; do
    echo; echo "==== $pkg: LICENSE ===="; cat "node_modules/$pkg/LICENSE"
    if [ -f "node_modules/$pkg/NOTICE" ]; then
      echo; echo "==== $pkg: NOTICE ===="; cat "node_modules/$pkg/NOTICE"
    fi
  done
} > vendor/LICENSES.txt
echo "vendored: $(head -n 7 vendor/LICENSES.txt | tail -n 4 | tr '\n' ' ')"
