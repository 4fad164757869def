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

// ONNX Runtime (1.29 and later, Linux and macOS) posts usage telemetry to Microsoft some seconds after its first
// session. Like edgetl, this app turns that off unless the user has set the variable; the native library reads it
// from the environment, so it is set before the require.
if (process.env.ORT_DISABLE_TELEMETRY === undefined) process.env.ORT_DISABLE_TELEMETRY = "1";

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
  let img;
  if (data[0] === 0xff && data[1] === 0xd8) {
    const d = jpeg.decode(data, { useTArray: true, formatAsRGBA: true });
    img = { width: d.width, height: d.height, rgba: d.data };
  } else if (data.subarray(1, 4).toString() === "PNG") {
    const d = PNG.sync.read(data);
    img = { width: d.width, height: d.height, rgba: d.data };
  } else {
    throw new Error(`${path}: only JPEG and PNG are supported by this example`);
  }
  // Phone photos are often stored sideways with an EXIF orientation tag; edgetl's Python runtime
  // applies it (Pillow's ImageOps.exif_transpose), so the app must too or it classifies a rotated photo.
  return applyOrientation(img, exifOrientation(data));
}

// The EXIF orientation (1-8) of a JPEG (APP1 "Exif" segment) or PNG (eXIf chunk); 1 when there is none.
function exifOrientation(data) {
  let tiff = null;
  if (data[0] === 0xff && data[1] === 0xd8) {
    let pos = 2;
    while (pos + 4 <= data.length && data[pos] === 0xff) {
      const marker = data[pos + 1];
      const len = data.readUInt16BE(pos + 2);
      if (marker === 0xe1 && data.subarray(pos + 4, pos + 10).toString("latin1") === "Exif\0\0") {
        tiff = data.subarray(pos + 10, pos + 2 + len);
        break;
      }
      if (marker === 0xda) break; // start of scan: no metadata after this
      pos += 2 + len;
    }
  } else {
    let pos = 8;
    while (pos + 8 <= data.length) {
      const len = data.readUInt32BE(pos);
      const type = data.subarray(pos + 4, pos + 8).toString("latin1");
      if (type === "eXIf") {
        tiff = data.subarray(pos + 8, pos + 8 + len);
        break;
      }
      if (type === "IDAT" || type === "IEND") break;
      pos += 12 + len;
    }
  }
  if (!tiff || tiff.length < 8) return 1;
  const little = tiff.toString("latin1", 0, 2) === "II";
  const u16 = (o) => (little ? tiff.readUInt16LE(o) : tiff.readUInt16BE(o));
  const u32 = (o) => (little ? tiff.readUInt32LE(o) : tiff.readUInt32BE(o));
  const ifd = u32(4);
  if (ifd + 2 > tiff.length) return 1;
  const entries = u16(ifd);
  for (let i = 0; i < entries; i++) {
    const e = ifd + 2 + i * 12;
    if (e + 12 > tiff.length) break;
    if (u16(e) === 0x0112) {
      const v = u16(e + 8);
      return v >= 1 && v <= 8 ? v : 1;
    }
  }
  return 1;
}

// Pillow's exif_transpose as a pixel mapping: output (x, y) takes source pixel map(x, y).
function applyOrientation(img, orientation) {
  if (orientation === 1) return img;
  const { width: W, height: H, rgba } = img;
  const swap = orientation >= 5;
  const outW = swap ? H : W;
  const outH = swap ? W : H;
  const map = {
    2: (x, y) => [W - 1 - x, y], // mirror
    3: (x, y) => [W - 1 - x, H - 1 - y], // 180
    4: (x, y) => [x, H - 1 - y], // flip
    5: (x, y) => [y, x], // transpose
    6: (x, y) => [y, H - 1 - x], // 90 clockwise
    7: (x, y) => [W - 1 - y, H - 1 - x], // transverse
    8: (x, y) => [W - 1 - y, x], // 90 counter-clockwise
  }[orientation];
  const out = new Uint8Array(outW * outH * 4);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const [sx, sy] = map(x, y);
      const s = (sy * W + sx) * 4;
      const d = (y * outW + x) * 4;
      out[d] = rgba[s];
      out[d + 1] = rgba[s + 1];
      out[d + 2] = rgba[s + 2];
      out[d + 3] = rgba[s + 3];
    }
  }
  return { width: outW, height: outH, rgba: out };
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
