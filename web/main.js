// The page: pick a staged model and an image, watch the image leave at an exit.
// window.mess exposes the same actions to the tests (tests/test_web.py drives them headless).
import {loadLiteRt} from '@litertjs/core';
import {InputError, StagedModel} from './staged.js';

const $ = (id) => document.getElementById(id);
const state = {model: null, image: null, imageName: ''};
const OVERLAY_ALPHA = 0.5; // weight of the class colours, as mess_tf.visualize.overlay

// The PASCAL VOC colour map (mess_tf.data.info.bitmap_palette): the demo's and VOC's palette.
function palette(count) {
  return Array.from({length: count}, (_, index) => {
    let [value, r, g, b] = [index, 0, 0, 0];
    for (let shift = 7; shift >= 0; shift--) {
      r |= (value & 1) << shift;
      g |= ((value >> 1) & 1) << shift;
      b |= ((value >> 2) & 1) << shift;
      value >>= 3;
    }
    return [r, g, b];
  });
}

// A threshold or confidence as shown: 4 decimals, '–' where there is none (the final exit).
const fixed = (value) => (value === null || value === undefined ? '–' : value.toFixed(4));

function say(message, kind = '') {
  $('status').textContent = message;
  $('status').className = kind;
}

// Runs an action; bad input becomes a message on the page, which keeps working.
async function guarded(action) {
  try {
    return await action();
  } catch (e) {
    if (!(e instanceof InputError)) console.error(e);
    say(e.message, 'error');
    return null;
  }
}

async function fetchBytes(url, what) {
  const response = await fetch(url);
  if (!response.ok) throw new InputError(`${what} not found: ${url} (HTTP ${response.status})`);
  return new Uint8Array(await response.arrayBuffer());
}

function parseMetadata(bytes, source) {
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    throw new InputError(`${source} is not valid JSON: ${e.message}`);
  }
}

async function useModel(modelBytes, metadataBytes, source) {
  if (metadataBytes === null) {
    throw new InputError(`${source} has no metadata: a staged MESS model comes with MODEL.tflite.json beside it ` +
                         '(tools.export writes both)');
  }
  const model = await StagedModel.load(modelBytes, parseMetadata(metadataBytes, `${source}.json`));
  state.model?.delete();
  state.model = model;
  showModel(source);
  say(`loaded ${source}`);
  if (state.image) await segment();
  return describe(model);
}

async function loadModelUrl(url) {
  const modelBytes = await fetchBytes(url, 'model');
  const response = await fetch(`${url}.json`);
  const metadataBytes = response.ok ? new Uint8Array(await response.arrayBuffer()) : null;
  return useModel(modelBytes, metadataBytes, url);
}

async function loadModelFiles(files) {
  const tflite = files.find((f) => f.name.endsWith('.tflite'));
  if (!tflite) throw new InputError('pick the .tflite file (and its .tflite.json)');
  const json = files.find((f) => f.name === `${tflite.name}.json`) ?? files.find((f) => f.name.endsWith('.json'));
  const bytes = async (f) => new Uint8Array(await f.arrayBuffer());
  return useModel(await bytes(tflite), json ? await bytes(json) : null, tflite.name);
}

function describe(model) {
  const m = model.metadata;
  return {precision: m.precision, mode: m.mode, exits: model.exitIds, thresholds: model.thresholds,
          inputSize: model.inputSize, signatures: Object.keys(m.signatures)};
}

function showModel(source) {
  const m = state.model.metadata;
  $('mode').value = m.mode;
  $('exit-index').replaceChildren(...state.model.exitIds.map((id, k) => new Option(`${k + 1}: ${id}`, k)));
  $('exit-index').value = state.model.exitIds.length - 1;
  const rows = m.stages.map((s) => `<tr><td class="name">${s.signature}</td><td class="name">${s.exit_id}</td>` +
    `<td>${fixed(s.th_pix)}</td><td>${fixed(s.th_img)}</td><td class="name">${s.class_map_signature ?? '–'}</td></tr>`);
  $('model-info').innerHTML = `<p><b>${source}</b>: ${m.precision}, exported for ${m.mode} mode, input ` +
    `${m.input.size.join('×')}, ${m.classes.length} classes</p><table><tr><th>signature</th><th>exit</th>` +
    `<th>th_pix</th><th>th_img</th><th>class map</th></tr>${rows.join('')}</table>`;
}

// An image (ImageBitmap) at the model's input size as RGB 0..255 floats; resized if need be.
function toInput(bitmap, name) {
  const [height, width] = state.model ? state.model.inputSize : [bitmap.height, bitmap.width];
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext('2d', {willReadFrequently: true});
  context.drawImage(bitmap, 0, 0, width, height);
  const rgba = context.getImageData(0, 0, width, height).data;
  const rgb = new Float32Array(width * height * 3);
  for (let i = 0; i < width * height; i++) for (let c = 0; c < 3; c++) rgb[3 * i + c] = rgba[4 * i + c];
  const resized = bitmap.width !== width || bitmap.height !== height;
  return {rgb, rgba, width, height, name, note: resized ?
    `${name} is ${bitmap.width}×${bitmap.height}; resized to the model's ${width}×${height} (the browser's bilinear resize, not PIL's)` : ''};
}

async function setImage(blob, name) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, {colorSpaceConversion: 'none', premultiplyAlpha: 'none'});
  } catch {
    throw new InputError(`${name} is not an image this browser can decode`);
  }
  state.bitmap = bitmap;
  state.imageName = name;
  state.image = toInput(bitmap, name);
  if (!state.model) {
    draw(null);
    say(`${name}: now load a model`, 'note');
    return null;
  }
  return segment();
}

async function segment() {
  if (state.image.width !== state.model.inputSize[1] || state.image.height !== state.model.inputSize[0]) {
    state.image = toInput(state.bitmap, state.imageName); // a new model of another size
  }
  const mode = $('mode').value;
  const deadline = $('deadline').value;
  const result = await state.model.run(state.image.rgb, {mode, exitIndex: Number($('exit-index').value),
                                                         deadlineMs: mode === 'anytime' && deadline !== '' ? Number(deadline) : null});
  draw(result);
  showResult(result, mode);
  say(state.image.note || `${state.image.name}: left at exit ${result.exitIndex + 1} (${result.exitId})`,
      state.image.note ? 'note' : '');
  return result;
}

function draw(result) {
  const {width, height, rgba} = state.image;
  const canvas = $('canvas');
  [canvas.width, canvas.height] = [width, height];
  const out = new ImageData(new Uint8ClampedArray(rgba), width, height);
  if (result) {
    const colours = palette(state.model.metadata.classes.length);
    for (let i = 0; i < width * height; i++) {
      const colour = colours[result.classMap[i]];
      for (let c = 0; c < 3; c++) out.data[4 * i + c] = Math.floor((1 - OVERLAY_ALPHA) * rgba[4 * i + c] + OVERLAY_ALPHA * colour[c] + 0.5);
    }
  }
  canvas.getContext('2d').putImageData(out, 0, 0);
}

function showResult(result, mode) {
  const {stages, classes} = state.model.metadata;
  const rows = result.stageMs.map((ms, k) => {
    const confidence = fixed(result.confidences[k]);
    return `<tr class="${k === result.exitIndex ? 'taken' : ''}"><td class="name">${stages[k].signature}</td>` +
      `<td class="name">${stages[k].exit_id}</td><td>${ms.toFixed(1)}</td><td>${confidence}</td>` +
      `<td>${fixed(stages[k].th_img)}</td></tr>`;
  });
  const present = [...new Set(result.classMap)].sort((a, b) => a - b);
  const colours = palette(classes.length);
  const legend = present.map((c) => `<div><span class="swatch" style="background:rgb(${colours[c]})"></span>${classes[c]}</div>`);
  const deadline = mode === 'anytime' && !result.deadlineMet ? ' (missed the deadline: the first map)' : '';
  $('details').innerHTML = `<p>exit taken: <b>${result.exitIndex + 1} of ${stages.length}, ${result.exitId}</b>` +
    `${deadline}; ${result.totalMs.toFixed(1)} ms in all</p><table><tr><th>stage</th><th>exit</th><th>ms</th>` +
    `<th>image confidence</th><th>th_img</th></tr>${rows.join('')}</table>${legend.join('')}`;
}

async function imageFromUrl(url) {
  const response = await fetch(url);
  if (!response.ok) throw new InputError(`image not found: ${url} (HTTP ${response.status})`);
  return setImage(await response.blob(), url.split('/').at(-1));
}

// What the tests read: the class map as base64 (uint8 [H * W]), the rest as it is.
function serialise(result) {
  if (!result) return null;
  let binary = '';
  for (let i = 0; i < result.classMap.length; i += 8192) {
    binary += String.fromCharCode(...result.classMap.subarray(i, i + 8192));
  }
  return {...result, classMap: btoa(binary), shape: [state.image.height, state.image.width]};
}

window.mess = {
  loadModel: (url) => {
    $('model-url').value = url;
    return guarded(() => loadModelUrl(url));
  },
  // options: {mode, exitIndex, deadlineMs}, set as a person would in the controls.
  segment: async (imageUrl, {mode, exitIndex = null, deadlineMs = null} = {}) => {
    $('mode').value = mode ?? state.model.metadata.mode;
    $('exit-index').value = exitIndex ?? state.model.exitIds.length - 1;
    $('deadline').value = deadlineMs ?? '';
    return serialise(await guarded(() => imageFromUrl(imageUrl)));
  },
  timeSignatures: async (imageUrl, runs) => {
    await imageFromUrl(imageUrl);
    return state.model.timeSignatures(state.image.rgb, runs);
  },
  status: () => ({text: $('status').textContent, kind: $('status').className}),
};

async function main() {
  await loadLiteRt(new URL('node_modules/@litertjs/core/wasm/', location.href).href);
  $('load-url').onclick = () => guarded(() => loadModelUrl($('model-url').value));
  $('model-files').onchange = (e) => guarded(() => loadModelFiles([...e.target.files]));
  $('image-file').onchange = (e) => guarded(() => setImage(e.target.files[0], e.target.files[0].name));
  $('sample').onchange = (e) => e.target.value && guarded(() => imageFromUrl(e.target.value));
  for (const id of ['mode', 'exit-index', 'deadline']) $(id).onchange = () => state.model && state.image && guarded(segment);
  // models/index.json (written by tools.web) lists the models and sample images served.
  const index = await fetch('models/index.json').then((r) => (r.ok ? r.json() : {models: [], images: []}));
  $('model-list').replaceChildren(...index.models.map((m) => new Option(m, `models/${m}`)));
  $('sample').append(...index.images.map((name) => new Option(name, `models/images/${name}`)));
  const requested = new URLSearchParams(location.search).get('model') ?? (index.models[0] && `models/${index.models[0]}`);
  if (requested) {
    $('model-url').value = requested;
    await guarded(() => loadModelUrl(requested));
  }
  window.mess.ready = true;
}

main().catch((e) => say(`the page failed to start: ${e.message}`, 'error'));
