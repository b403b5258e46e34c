// Drives the page in the system's headless Chromium (puppeteer-core downloads no browser).
//   node web/drive.mjs URL
// Reads one JSON request a line on stdin, {"method": name, "args": [...]}, and answers each with
// one JSON line on stdout, {"result": ...} or {"error": message}: "screenshot" (args: a PNG
// path) is puppeteer's, every other method is window.mess[method](...args) in the page.
// The page's console goes to stderr.
import readline from 'node:readline';
import puppeteer from 'puppeteer-core';

const [url] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox'], // the tests run as root
});
try {
  const page = await browser.newPage();
  await page.setViewport({width: 1100, height: 800});
  page.on('console', (message) => process.stderr.write(`page: ${message.text()}\n`));
  page.on('pageerror', (error) => process.stderr.write(`page error: ${error.message}\n`));
  await page.goto(url);
  await page.waitForFunction(() => window.mess?.ready, {timeout: 60000});
  process.stdout.write('{"result": "ready"}\n');
  for await (const line of readline.createInterface({input: process.stdin})) {
    const {method, args} = JSON.parse(line);
    let answer;
    try {
      answer = {result: method === 'screenshot' ? await page.screenshot({path: args[0], fullPage: true}) && args[0]
        : await page.evaluate((m, a) => window.mess[m](...a), method, args)};
    } catch (e) {
      answer = {error: e.message};
    }
    process.stdout.write(`${JSON.stringify(answer)}\n`);
  }
} finally {
  await browser.close();
}
