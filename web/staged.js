// A staged MESS model (mess_tf.export.export_staged_model) run with LiteRT.js, exactly as
// mess_tf.runtime.StagedModel runs it: stage after stage, an early exit's class map only when it
// is shown, and the same decisions (confidence >= th_img, compared in float32 as numpy does).
import {loadAndCompile, Tensor} from '@litertjs/core';

export const FORMAT = 'mess_tf.staged/3';
export const MODES = ['budgeted', 'dynamic', 'anytime'];
const CONFIDENCE = 'confidence';
const COARSE_LOGITS = 'coarse_logits';
const CLASS_MAP = 'class_map';
const TYPED_ARRAYS = {float32: Float32Array, uint8: Uint8Array};
// LiteRT.js's CPU runtime: one thread (threads need COOP/COEP, and 4 or more crashed on delete).
const COMPILE_OPTIONS = {accelerator: 'wasm', cpuOptions: {numThreads: 1}};

// Bad input (a model, its metadata, an image): the page shows the message and keeps working.
export class InputError extends Error {}

// Checks the metadata's shape before anything is loaded; returns it.
export function checkMetadata(metadata) {
  if (typeof metadata?.format !== 'string' || !metadata.format.startsWith('mess_tf.staged/')) {
    throw new InputError('this is not the metadata of a staged MESS model (no "format": "mess_tf.staged/…")');
  }
  if (metadata.format !== FORMAT) {
    throw new InputError(`metadata format ${metadata.format} is not the one this page reads (${FORMAT}); ` +
                         'export the model again with this version of mess-tf');
  }
  for (const key of ['stages', 'signatures', 'input', 'class_map', 'classes']) {
    if (!metadata[key]) throw new InputError(`the metadata has no "${key}"`);
  }
  return metadata;
}

// The signatures of the compiled model against the metadata's: names, inputs, outputs, dtypes.
function checkSignatures(compiled, metadata) {
  const actual = compiled.signatures;
  const wanted = Object.keys(metadata.signatures).sort();
  const have = Object.keys(actual).sort();
  if (wanted.join() !== have.join()) {
    throw new InputError(`the model's signatures [${have}] do not match its metadata's [${wanted}]`);
  }
  for (const key of wanted) {
    for (const [side, details] of [['inputs', actual[key].getInputDetails()],
                                   ['outputs', actual[key].getOutputDetails()]]) {
      const spec = metadata.signatures[key][side];
      const names = details.map((d) => d.name).sort();
      if (names.join() !== Object.keys(spec).sort().join()) {
        throw new InputError(`signature ${key}: ${side} [${names}] do not match the metadata's [${Object.keys(spec)}]`);
      }
      for (const d of details) {
        if (d.dtype !== spec[d.name].dtype) {
          throw new InputError(`signature ${key}: ${d.name} is ${d.dtype}, the metadata says ${spec[d.name].dtype}`);
        }
      }
    }
  }
}

// numpy's np.round: halves to even.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// float -> a boundary tensor's stored values (runtime.quantise, in float32 as numpy computes it).
function quantise(values, spec) {
  if (spec.dtype === 'float32' || spec.scale === 0) return Float32Array.from(values);
  const scale = Math.fround(spec.scale);
  const out = new Uint8Array(values.length);
  for (let i = 0; i < values.length; i++) {
    out[i] = Math.min(255, Math.max(0, roundHalfEven(Math.fround(Math.fround(values[i] / scale) + spec.zero_point))));
  }
  return out;
}

// A stored value -> float32 (runtime.dequantise).
function dequantise(value, spec) {
  if (spec.dtype === 'float32' || spec.scale === 0) return value;
  return Math.fround((value - spec.zero_point) * Math.fround(spec.scale));
}

// uint8 [H', W'] -> [H' * s, W' * s], nearest neighbour (export.upsample_class_map).
function upsample(classMap, height, width, s) {
  if (s === 1) return classMap;
  const out = new Uint8Array(height * width * s * s);
  for (let y = 0; y < height * s; y++) {
    for (let x = 0; x < width * s; x++) out[y * width * s + x] = classMap[Math.floor(y / s) * width + Math.floor(x / s)];
  }
  return out;
}

export class StagedModel {
  // modelBytes: Uint8Array of the .tflite; metadata: its MODEL.tflite.json, parsed.
  static async load(modelBytes, metadata) {
    checkMetadata(metadata);
    let compiled;
    try {
      compiled = await loadAndCompile(modelBytes, COMPILE_OPTIONS);
    } catch (e) {
      const hint = /INT8/.test(e.message) ? ' (LiteRT.js has no int8 tensors: export with --integer_io=uint8)' : '';
      throw new InputError(`LiteRT.js cannot load this model: ${e.message}${hint}`);
    }
    try {
      checkSignatures(compiled, metadata);
    } catch (e) {
      compiled.delete();
      throw e;
    }
    return new StagedModel(compiled, metadata);
  }

  constructor(compiled, metadata) {
    this.compiled = compiled;
    this.metadata = metadata;
    this.stages = metadata.stages;
    this.inputSize = metadata.input.size; // [H, W]
  }

  get exitIds() { return this.stages.map((s) => s.exit_id); }

  get thresholds() { return this.stages.filter((s) => s.th_img !== null).map((s) => s.th_img); }

  delete() { this.compiled.delete(); }

  tensor(signature, name, values) {
    const spec = this.metadata.signatures[signature].inputs[name];
    return new Tensor(quantise(values, spec), spec.shape);
  }

  // rgb: Float32Array [H * W * 3], RGB 0..255 at the model's input size.
  // Yields {classMap: Uint8Array [H * W] or null, exitIndex, exitId, confidences (float32 values),
  // stageMs, totalMs} after each exit (stopEarly: only the exit taken), as runtime.anytime does.
  async* anytime(rgb, {thImg = null, stopEarly = false} = {}) {
    const thresholds = thImg ?? this.stages.map((s) => s.th_img);
    const start = performance.now();
    const available = {image: this.tensor(this.stages[0].signature, 'image', rgb)};
    const confidences = [];
    const stageMs = [];
    try {
      for (const [k, stage] of this.stages.entries()) {
        const stageStart = performance.now();
        const inputs = Object.fromEntries(stage.inputs.map((name) => [name, available[name]]));
        const outputs = await this.compiled.run(stage.signature, inputs);
        const specs = this.metadata.signatures[stage.signature].outputs;
        if (stage.th_img !== null) {
          confidences.push(dequantise((await outputs[CONFIDENCE].data())[0], specs[CONFIDENCE]));
        }
        const leaves = stopEarly && stage.th_img !== null && confidences.at(-1) >= thresholds[k];
        let classMap = null;
        if (stopEarly && !leaves && k + 1 < this.stages.length) {
          // passing on: this exit's class map is never shown
        } else if (stage.class_map_signature) {
          const result = await this.compiled.run(stage.class_map_signature, {[COARSE_LOGITS]: outputs[COARSE_LOGITS]});
          classMap = await result[CLASS_MAP].data();
          result[CLASS_MAP].delete();
        } else {
          classMap = await outputs[CLASS_MAP].data();
        }
        for (const [name, tensor] of Object.entries(outputs)) {
          if (stage.features.includes(name)) available[name] = tensor; // kept for any later stage
          else tensor.delete();
        }
        if (classMap !== null) {
          const {size, stride} = this.metadata.class_map;
          classMap = upsample(classMap, size[0], size[1], stride);
        }
        const now = performance.now();
        stageMs.push(now - stageStart);
        if (classMap !== null) {
          yield {classMap, exitIndex: k, exitId: stage.exit_id, confidences: [...confidences],
                 stageMs: [...stageMs], totalMs: now - start, deadlineMet: true};
        }
        if (leaves) return;
      }
    } finally {
      for (const tensor of Object.values(available)) tensor.delete();
    }
  }

  // One image in `mode` (default the exported one), as runtime.StagedModel.run:
  // budgeted: stop at exitIndex (default the last); dynamic: the metadata's thresholds (or thImg);
  // anytime: the latest map finished within deadlineMs (null: the final exit).
  async run(rgb, {mode = null, thImg = null, exitIndex = null, deadlineMs = null} = {}) {
    mode = mode ?? this.metadata.mode;
    if (!MODES.includes(mode)) throw new InputError(`mode ${mode} is not one of ${MODES}`);
    if (mode === 'budgeted') {
      const last = exitIndex ?? this.stages.length - 1;
      if (!(last >= 0 && last < this.stages.length)) {
        throw new InputError(`exit index ${exitIndex} is out of range: the model has exits ${this.exitIds}`);
      }
      // A dynamic run whose earlier exits never pass and whose exit `last` always does.
      thImg = this.stages.map((s, k) => (k === last ? -Infinity : Infinity));
      return this.last(this.anytime(rgb, {thImg, stopEarly: true}));
    }
    if (mode === 'dynamic') return this.last(this.anytime(rgb, {thImg: this.stageThresholds(thImg), stopEarly: true}));
    let latest = null;
    for await (const result of this.anytime(rgb)) {
      if (deadlineMs !== null && result.totalMs > deadlineMs) {
        if (latest === null) return {...result, deadlineMet: false};
        return latest; // the generator's finally releases the tensors
      }
      latest = result;
    }
    return latest;
  }

  stageThresholds(thImg) {
    if (thImg === null) return null;
    if (thImg.length !== this.thresholds.length) {
      throw new InputError(`${thImg.length} image thresholds given; the model has ${this.thresholds.length} early exits`);
    }
    return [...thImg, null];
  }

  async last(results) {
    let result = null;
    for await (result of results);
    return result;
  }

  // Median wall time (ms) of each signature over `runs` runs, fed what it gets on `rgb`.
  async timeSignatures(rgb, runs) {
    const feeds = await this.signatureInputs(rgb);
    const times = {};
    for (const [key, inputs] of Object.entries(feeds)) {
      const ms = [];
      for (let i = 0; i < runs + 1; i++) {
        const start = performance.now();
        const outputs = await this.compiled.run(key, inputs);
        for (const t of Object.values(outputs)) { await t.data(); t.delete(); }
        if (i > 0) ms.push(performance.now() - start); // the first run warms up
      }
      ms.sort((a, b) => a - b);
      times[key] = ms[Math.floor(ms.length / 2)];
    }
    for (const inputs of Object.values(feeds)) for (const t of Object.values(inputs)) t.delete();
    return times;
  }

  // {signature: {input name: Tensor}}: each signature's real inputs on one image (stages chained).
  async signatureInputs(rgb) {
    const available = {image: this.tensor(this.stages[0].signature, 'image', rgb)};
    const feeds = {};
    for (const stage of this.stages) {
      feeds[stage.signature] = await this.copies(stage.signature, stage.inputs, available);
      const outputs = await this.compiled.run(stage.signature, feeds[stage.signature]);
      for (const [name, tensor] of Object.entries(outputs)) {
        available[name]?.delete(); // an earlier exit's confidence or coarse logits, copied already
        available[name] = tensor;
      }
      if (stage.class_map_signature) {
        feeds[stage.class_map_signature] = await this.copies(stage.class_map_signature, [COARSE_LOGITS], available);
      }
    }
    for (const t of Object.values(available)) t.delete();
    return feeds;
  }

  async copies(signature, names, available) {
    const specs = this.metadata.signatures[signature].inputs;
    const entries = await Promise.all(names.map(async (name) => {
      const data = await available[name].data();
      return [name, new Tensor(new TYPED_ARRAYS[specs[name].dtype](data), specs[name].shape)];
    }));
    return Object.fromEntries(entries);
  }
}
