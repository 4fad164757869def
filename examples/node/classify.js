#!/usr/bin/env node
// Classify an image with an exported edgetl ONNX model, using onnxruntime-node only.
//
//   node classify.js MODEL.onnx IMAGE.(jpg|png) [--json]
//
// Everything the model needs comes from its own metadata (the edgetl metadata contract, version 1):
// labels, the resize of the shorter side, the centre crop, the interpolation, mean/std, layout.
// onnxruntime-node does not expose ONNX metadata_props, so they are read from the file directly:
// they are top-level field 14 of the ModelProto message, a few lines of protobuf decoding.
"use strict";

const fs = require("fs");
const ort = require("onnxruntime-node");
const jpeg = require("jpeg-js");
const { PNG } = require("pngjs");

// ---------------------------------------------------------------- ONNX metadata (protobuf)

function readVarint(buf, pos) {
  let result = 0n;
  let shift = 0n;
  for (;;) {
    const byte = buf[pos++];
    result |= BigInt(byte & 0x7f) << shift;
    if ((byte & 0x80) === 0) return [result, pos];
    shift += 7n;
  }
}

// Walk the fields of one protobuf message, calling visit(fieldNumber, bytes) for length-delimited ones.
function walk(buf, start, end, visit) {
  let pos = start;
  while (pos < end) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const field = Number(key >> 3n);
    const wire = Number(key & 7n);
    if (wire === 0) {
      [, pos] = readVarint(buf, pos);
    } else if (wire === 1) {
      pos += 8;
    } else if (wire === 5) {
      pos += 4;
    } else if (wire === 2) {
      let len;
      [len, pos] = readVarint(buf, pos);
      visit(field, buf.subarray(pos, pos + Number(len)));
      pos += Number(len);
    } else {
      throw new Error(`unsupported protobuf wire type ${wire}: not an ONNX file?`);
    }
  }
}

function readMetadata(modelPath) {
  const buf = fs.readFileSync(modelPath);
  const meta = {};
  walk(buf, 0, buf.length, (field, bytes) => {
    if (field !== 14) return; // ModelProto.metadata_props: StringStringEntryProto { key = 1; value = 2; }
    let key = "";
    let value = "";
    walk(bytes, 0, bytes.length, (f, b) => {
      if (f === 1) key = b.toString("utf8");
      if (f === 2) value = b.toString("utf8");
    });
    meta[key] = value;
  });
  if (!meta.labels) throw new Error(`${modelPath} has no edgetl metadata (export it with edgetl export)`);
  return meta;
}

// ---------------------------------------------------------------- decoding and preprocessing

function decodeImage(path) {
  const data = fs.readFileSync(path);
  if (data[0] === 0xff && data[1] === 0xd8) {
    const img = jpeg.decode(data, { useTArray: true, formatAsRGBA: true });
    return { width: img.width, height: img.height, rgba: img.data };
  }
  if (data.subarray(1, 4).toString() === "PNG") {
    const img = PNG.sync.read(data);
    return { width: img.width, height: img.height, rgba: img.data };
  }
  throw new Error(`${path}: only JPEG and PNG are supported by this example`);
}

// Pillow's resampling filters (the same kernels and support as PIL/Resample.c), so the pixels match
// what edgetl's Python pipeline feeds the model to within rounding.
const FILTERS = {
  bicubic: {
    support: 2,
    f(x) {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
  },
  bilinear: { support: 1, f: (x) => Math.max(0, 1 - Math.abs(x)) },
  nearest: { support: 0.5, f: (x) => (x >= -0.5 && x < 0.5 ? 1 : 0) },
};

// One separable pass along one axis, with Pillow's antialiasing (support widened when shrinking).
function resample1d(src, inSize, outSize, otherSize, horizontal, filter) {
  const scale = inSize / outSize;
  const fscale = Math.max(scale, 1);
  const support = filter.support * fscale;
  const out = new Float32Array(outSize * otherSize * 3);
  for (let o = 0; o < outSize; o++) {
    const center = (o + 0.5) * scale;
    const lo = Math.max(0, Math.floor(center - support + 0.5));
    const hi = Math.min(inSize, Math.floor(center + support + 0.5));
    const weights = [];
    let total = 0;
    for (let i = lo; i < hi; i++) {
      const w = filter.f((i - center + 0.5) / fscale);
      weights.push(w);
      total += w;
    }
    for (let k = 0; k < otherSize; k++) {
      for (let c = 0; c < 3; c++) {
        let acc = 0;
        for (let i = lo; i < hi; i++) {
          const idx = horizontal ? (k * inSize + i) * 3 + c : (i * otherSize + k) * 3 + c;
          acc += src[idx] * weights[i - lo];
        }
        const v = Math.min(255, Math.max(0, Math.round(acc / total))); // Pillow clips to 8 bits after each pass
        const dst = horizontal ? (k * outSize + o) * 3 + c : (o * otherSize + k) * 3 + c;
        out[dst] = v;
      }
    }
  }
  return out;
}

function preprocess(img, meta) {
  const S = Number(meta.resize_shorter_side);
  const C = Number(meta.input_size);
  const filter = FILTERS[meta.interpolation];
  if (!filter) throw new Error(`interpolation ${meta.interpolation} is not implemented in this example`);
  // RGBA -> RGB on white (as edgetl does for transparent images).
  let rgb = new Float32Array(img.width * img.height * 3);
  for (let p = 0; p < img.width * img.height; p++) {
    const a = img.rgba[p * 4 + 3] / 255;
    for (let c = 0; c < 3; c++) rgb[p * 3 + c] = Math.round(img.rgba[p * 4 + c] * a + 255 * (1 - a));
  }
  // Shorter side to S, longer side truncated like torchvision/edgetl.
  let w = img.width;
  let h = img.height;
  const [nw, nh] = w <= h ? [S, Math.floor((S * h) / w)] : [Math.floor((S * w) / h), S];
  if (nw !== w) {
    rgb = resample1d(rgb, w, nw, h, true, filter);
    w = nw;
  }
  if (nh !== h) {
    rgb = resample1d(rgb, h, nh, w, false, filter);
    h = nh;
  }
  const left = Math.round((w - C) / 2);
  const top = Math.round((h - C) / 2);
  const pixelsIn = meta.preprocessing_in_graph === "true";
  const mean = JSON.parse(meta.mean);
  const std = JSON.parse(meta.std);
  const scale = Number(meta.pixel_scale);
  const data = pixelsIn ? new Uint8Array(C * C * 3) : new Float32Array(3 * C * C);
  for (let y = 0; y < C; y++) {
    for (let x = 0; x < C; x++) {
      for (let c = 0; c < 3; c++) {
        const v = rgb[((y + top) * w + (x + left)) * 3 + c];
        if (pixelsIn) data[(y * C + x) * 3 + c] = v; // NHWC uint8
        else data[c * C * C + y * C + x] = (v / scale - mean[c]) / std[c]; // NCHW float
      }
    }
  }
  return new ort.Tensor(pixelsIn ? "uint8" : "float32", data, pixelsIn ? [1, C, C, 3] : [1, 3, C, C]);
}

// ---------------------------------------------------------------- main

async function main() {
  const [modelPath, imagePath, flag] = process.argv.slice(2);
  if (!modelPath || !imagePath) {
    console.error("usage: node classify.js MODEL.onnx IMAGE.(jpg|png) [--json]");
    process.exit(2);
  }
  const meta = readMetadata(modelPath);
  const labels = JSON.parse(meta.labels);
  const session = await ort.InferenceSession.create(modelPath);
  const input = preprocess(decodeImage(imagePath), meta);
  const output = await session.run({ [meta.input_name]: input });
  const logits = Array.from(output[meta.output_name].data);
  const max = Math.max(...logits);
  const exp = logits.map((v) => Math.exp(v - max));
  const sum = exp.reduce((a, b) => a + b, 0);
  const probs = exp.map((v) => v / sum);
  const best = probs.indexOf(Math.max(...probs));
  if (flag === "--json") {
    console.log(JSON.stringify({ path: imagePath, label: labels[best], probability: probs[best] }));
  } else {
    console.log(`${labels[best]} (${(probs[best] * 100).toFixed(1)}%)`);
  }
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
