// `npm run build` (make viewer): bundle src/review.js with NiiVue into one ES module and copy the
// page next to it, into ../services/review_ui/ (served at /review/ui/ by services/review_page.py).
// Written to a temporary folder first, then renamed: a half-built page is never served.
import { build } from "esbuild";
import { cpSync, mkdirSync, renameSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "services", "review_ui");
const tmp = `${out}.tmp-${process.pid}`;
rmSync(tmp, { recursive: true, force: true });
mkdirSync(tmp, { recursive: true });
try {
  await build({
    entryPoints: [join(here, "src", "review.js")],
    bundle: true,
    format: "esm",
    target: "es2022",
    minify: true,
    sourcemap: false,
    legalComments: "linked", // licences of the bundled packages (NiiVue: BSD-2) in review.js.LEGAL.txt
    outfile: join(tmp, "review.js"),
    logLevel: "warning",
  });
  for (const f of ["index.html", "review.css"]) cpSync(join(here, "src", f), join(tmp, f));
  rmSync(out, { recursive: true, force: true });
  renameSync(tmp, out);
} catch (e) {
  rmSync(tmp, { recursive: true, force: true });
  throw e;
}
console.log(`review page built in ${out}`);
