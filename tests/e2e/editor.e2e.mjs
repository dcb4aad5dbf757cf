// End-to-end test of /editor: Playwright (playwright-core) drives Debian's headless Chromium.
// Usage: node editor.e2e.mjs BASE_URL ADMIN_KEY  -> prints one JSON line {"version": N, "hash": "..."}
// Started by tests/test_editor_e2e.py, which then checks through the openai client that serving
// uses the saved version.
import { chromium } from "playwright-core";

const [base, key] = process.argv.slice(2);
const fail = (msg) => { throw new Error(msg); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"],
});
let state = null;
try {
  const page = await browser.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  // HTTP errors the page handles (the 422 of an invalid preview, a missing favicon) are logged by
  // Chromium as "Failed to load resource"; anything else on the console is a script error.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) pageErrors.push(m.text());
  });
  // HTTP errors seen by the page, reported with its state if a step times out
  const httpErrors = [];
  page.on("response", (r) => { if (r.status() >= 400) httpErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`); });
  state = async () => JSON.stringify({
    status: await page.textContent("#status").catch(String),
    problem: await page.textContent("#problem").catch(String),
    previewMeta: await page.textContent("#preview-meta").catch(String),
    httpErrors, pageErrors,
  });
  page.setDefaultTimeout(60000);  // one preview renders and ranks on a CPU the rest of the suite may share

  await page.goto(base + "/editor");
  await page.fill("#key", key);
  await page.dispatchEvent("#key", "change");
  await page.click('#templates li[data-name="default"]');
  await page.waitForFunction(() => document.querySelector("#source").value.includes("Next item ID?"));
  await page.waitForFunction(() => document.querySelector("#messages").textContent.includes("Next item ID?"));
  const original = await page.inputValue("#source");

  // 1. an edit changes the live preview (rendered prompt and recommendations)
  const edited = original.replace("Next item ID?", "Which item comes next? (e2e)");
  await page.fill("#source", edited);
  await page.waitForFunction(() => document.querySelector("#messages").textContent.includes("Which item comes next? (e2e)"));
  await page.waitForFunction(() => document.querySelectorAll("#recs li").length === 10);
  const flag = await page.textContent("#preview-meta");
  if (!flag.includes("differs from training")) fail("preview does not flag the edit as differing from training: " + flag);

  // 2. an invalid edit shows the error inline, with its line, and marks that line
  await page.fill("#source", edited.replace("Which item comes next? (e2e)", "{{ history | nosuchfilter }}"));
  await page.waitForSelector("#problem:not([hidden])");
  const problem = await page.textContent("#problem");
  if (!/^line \d+, column \d+: /.test(problem)) fail("problem shown without line/column: " + problem);
  if ((await page.locator("#highlight .ln.err").count()) !== 1) fail("error line not marked");

  // 3. markup in a template is shown as text, never executed
  await page.fill("#source", edited.replace("Which item comes next? (e2e)", "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>"));
  await page.waitForFunction(() => document.querySelector("#messages").textContent.includes("<script>window.__pwned=2</script>"));
  if (await page.evaluate(() => window.__pwned !== undefined)) fail("template markup was executed");
  if ((await page.locator("#messages img, #messages script").count()) !== 0) fail("template markup became elements");

  // 4. save the good edit; the page reloads it as the new active version
  await page.fill("#source", edited);
  await page.fill("#message", "e2e: reworded the question");
  await page.click("#save");
  await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Saved default v"));
  const version = Number((await page.textContent("#status")).replace("Saved default v", ""));
  // the page reloads the saved version: its badge, and the history's active row
  await page.waitForFunction((v) => document.querySelector("#current-version").textContent === "v" + v, version);
  await page.waitForFunction((v) => document.querySelector("#history tbody tr.active td").textContent.startsWith("v" + v + " "), version);
  const hash = (await page.textContent("#templates li.selected small")).split(" · ")[1];
  await page.waitForFunction(() => document.querySelector("#messages").textContent.includes("Which item comes next? (e2e)"));
  if (process.env.E2E_SCREENSHOT) await page.screenshot({ path: process.env.E2E_SCREENSHOT, fullPage: true });
  if (pageErrors.length) fail("page errors: " + pageErrors.join("; "));
  console.log(JSON.stringify({ version, hash }));
} catch (e) {
  if (state) console.error("page state when it failed: " + await state().catch(String));
  throw e;
} finally {
  await browser.close();
}
