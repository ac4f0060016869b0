//! Pixel decoding: stored pixel data (any transfer syntax dicom-pixeldata can
//! decode) → f32 samples, then the DICOM grayscale pipeline (Modality LUT →
//! VOI LUT → presentation polarity) or the colour → luma conversion.
//!
//! Standards followed (DICOM PS3.3):
//! - C.7.6.3 Image Pixel module: Bits Allocated / Stored / High Bit, Pixel
//!   Representation, Planar Configuration, Photometric Interpretation
//!   (C.7.6.3.1.2, incl. YBR_FULL and YBR_FULL_422 equations).
//! - C.7.6.3.1.5/6 and C.7.9 Palette Color Lookup Table.
//! - C.11.1 Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence).
//! - C.11.2 VOI LUT (Window Center/Width with VOI LUT Function LINEAR,
//!   LINEAR_EXACT, SIGMOID, C.11.2.1.2; or VOI LUT Sequence).
//! - C.7.6.16 functional groups for Enhanced MR (Pixel Value Transformation
//!   and Frame VOI LUT per frame).
//!
//! Grayscale from colour follows PIL's `convert("L")`, i.e. ITU-R 601-2 luma
//! L = R·299/1000 + G·587/1000 + B·114/1000, but on f32 values (no rounding to
//! 8 bits), so results agree with Pillow to within half a grey level.

use std::panic::{AssertUnwindSafe, catch_unwind};

use dicom_dictionary_std::tags;
use dicom_object::FileDicomObject;
use dicom_pixeldata::PixelDecoder;
use serde::Deserialize;

use super::attrs::{self, Obj};

/// Why one frame of one instance could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("missing or invalid attribute {0}")]
    Attribute(&'static str),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("pixel data too short: frame {frame} needs {need} bytes, {have} present")]
    Truncated {
        frame: u32,
        need: usize,
        have: usize,
    },
    #[error("frame {frame} out of range ({frames} frames)")]
    FrameOutOfRange { frame: u32, frames: u32 },
    #[error("pixel data decoder failed: {0}")]
    Codec(String),
    #[error("not a grayscale image ({0})")]
    NotGrayscale(String),
}

/// Which window to use when Window Center/Width hold several values
/// (PS3.3 C.11.2.1.2: the values are alternative views; the first is the
/// modality's suggested default).
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VoiWindowChoice {
    /// The first window (DICOM's default presentation). Default.
    #[default]
    First,
    /// The widest window (keeps the most of the dynamic range).
    Widest,
    /// The window at this 0-based index, or the first when there are fewer.
    Index(usize),
}

/// A single-channel f32 image, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl GrayImage {
    pub fn get(&self, x: usize, y: usize) -> f32 {
        self.data[y * self.width + x]
    }
}

/// Interleaved RGB in [0,1].
#[derive(Clone, Debug)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// Image Pixel module description of one instance (PS3.3 C.7.6.3).
#[derive(Clone, Debug)]
pub struct PixelInfo {
    pub rows: usize,
    pub cols: usize,
    pub samples_per_pixel: usize,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub high_bit: u16,
    pub signed: bool,
    pub planar: u16,
    pub photometric: String,
    pub frames: u32,
    pub transfer_syntax: String,
}

pub fn pixel_info(obj: &FileDicomObject<Obj>) -> Result<PixelInfo, DecodeError> {
    let rows = attrs::int(obj, tags::ROWS).ok_or(DecodeError::Attribute("Rows"))?;
    let cols = attrs::int(obj, tags::COLUMNS).ok_or(DecodeError::Attribute("Columns"))?;
    if rows <= 0 || cols <= 0 || rows > 65535 || cols > 65535 {
        return Err(DecodeError::Attribute("Rows/Columns"));
    }
    let ba =
        attrs::int(obj, tags::BITS_ALLOCATED).ok_or(DecodeError::Attribute("BitsAllocated"))?;
    if !matches!(ba, 8 | 16 | 32) {
        return Err(DecodeError::Unsupported(format!("BitsAllocated {ba}")));
    }
    let bs = attrs::int(obj, tags::BITS_STORED)
        .unwrap_or(ba)
        .clamp(1, ba);
    let hb = attrs::int(obj, tags::HIGH_BIT)
        .unwrap_or(bs - 1)
        .clamp(bs - 1, ba - 1);
    let spp = attrs::int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    if spp != 1 && spp != 3 {
        return Err(DecodeError::Unsupported(format!("SamplesPerPixel {spp}")));
    }
    let photometric = attrs::text(obj, tags::PHOTOMETRIC_INTERPRETATION)
        .map(|s| s.to_ascii_uppercase())
        .ok_or(DecodeError::Attribute("PhotometricInterpretation"))?;
    let frames = attrs::int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    Ok(PixelInfo {
        rows: rows as usize,
        cols: cols as usize,
        samples_per_pixel: spp as usize,
        bits_allocated: ba as u16,
        bits_stored: bs as u16,
        high_bit: hb as u16,
        signed: attrs::int(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1,
        planar: attrs::int(obj, tags::PLANAR_CONFIGURATION).unwrap_or(0) as u16,
        photometric,
        frames: frames.min(u32::MAX as i64) as u32,
        transfer_syntax: obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string(),
    })
}

/// Stored sample values of one frame, after unpacking (mask to Bits Stored,
/// sign extension), interleaved when 3 samples per pixel.
struct Samples {
    width: usize,
    height: usize,
    channels: usize,
    values: Vec<f32>,
    /// Photometric interpretation of `values` (after the codec's own colour
    /// conversion and our YBR_FULL_422 expansion).
    photometric: String,
}

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

fn is_native(ts: &str) -> bool {
    matches!(
        ts,
        "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.2"
            | "1.2.840.10008.1.2.1.99"
    )
}

fn read_samples(
    obj: &FileDicomObject<Obj>,
    info: &PixelInfo,
    frame: u32,
) -> Result<Samples, DecodeError> {
    if frame >= info.frames {
        return Err(DecodeError::FrameOutOfRange {
            frame,
            frames: info.frames,
        });
    }
    let (w, h, spp) = (info.cols, info.rows, info.samples_per_pixel);
    let bps = (info.bits_allocated / 8) as usize;
    let mut photometric = info.photometric.clone();
    let raw: Vec<u8> = if is_native(&info.transfer_syntax) {
        native_frame(obj, info, frame, &mut photometric)?
    } else {
        encapsulated_frame(obj, info, frame, &mut photometric)?
    };
    let count = w * h * spp;
    let need = count * bps;
    if raw.len() < need {
        return Err(DecodeError::Truncated {
            frame,
            need,
            have: raw.len(),
        });
    }
    let values = sample_values(&raw[..need], info, bps);
    Ok(Samples {
        width: w,
        height: h,
        channels: spp,
        values,
        photometric,
    })
}

/// The stored values of `raw` as f32 (Bits Stored / High Bit / Pixel
/// Representation, PS3.5 8.1.1), little-endian samples of `bps` bytes.
fn sample_values(raw: &[u8], info: &PixelInfo, bps: usize) -> Vec<f32> {
    let shift = (info.high_bit + 1 - info.bits_stored) as u32;
    let bs = info.bits_stored as u32;
    let mask: u64 = if bs >= 32 {
        u32::MAX as u64
    } else {
        (1u64 << bs) - 1
    };
    let signed = info.signed;
    let conv = |v: u64| -> f32 {
        let v = (v >> shift) & mask;
        if signed && bs < 64 && (v >> (bs - 1)) & 1 == 1 {
            (v as i64 - (1i64 << bs)) as f32
        } else {
            v as f32
        }
    };
    // Unsigned samples of at most 16 bits: the same values through u32
    // arithmetic, which vectorises (the generic u64 path does not).
    let mask32 = mask as u32;
    match bps {
        1 if !signed => raw
            .iter()
            .map(|&b| ((b as u32 >> shift) & mask32) as f32)
            .collect(),
        2 if !signed => raw
            .chunks_exact(2)
            .map(|c| ((u16::from_le_bytes([c[0], c[1]]) as u32 >> shift) & mask32) as f32)
            .collect(),
        1 => raw.iter().map(|&b| conv(b as u64)).collect(),
        2 => raw
            .chunks_exact(2)
            .map(|c| conv(u16::from_le_bytes([c[0], c[1]]) as u64))
            .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|c| conv(u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64))
            .collect(),
    }
}

/// One frame of native (uncompressed) pixel data, as interleaved samples:
/// YBR_FULL_422 expanded to YBR_FULL, Planar Configuration 1 interleaved.
fn native_frame(
    obj: &FileDicomObject<Obj>,
    info: &PixelInfo,
    frame: u32,
    photometric: &mut String,
) -> Result<Vec<u8>, DecodeError> {
    let (w, h, spp) = (info.cols, info.rows, info.samples_per_pixel);
    let bps = (info.bits_allocated / 8) as usize;
    let pd = obj
        .get(tags::PIXEL_DATA)
        .ok_or(DecodeError::Attribute("PixelData"))?;
    let prim = pd.value().primitive().ok_or_else(|| {
        DecodeError::Unsupported("encapsulated pixel data in a native transfer syntax".into())
    })?;
    let bytes = prim.to_bytes();
    // YBR_FULL_422 native: two luma samples share one Cb/Cr pair
    // (PS3.3 C.7.6.3.1.2), so a frame is 2 samples per pixel, not 3.
    let ybr422 = *photometric == "YBR_FULL_422" && spp == 3;
    let frame_len = if ybr422 {
        w * h * 2 * bps
    } else {
        w * h * spp * bps
    };
    let start = frame_len * frame as usize;
    let end = start + frame_len;
    let slice = bytes.get(start..end).ok_or(DecodeError::Truncated {
        frame,
        need: end,
        have: bytes.len(),
    })?;
    if ybr422 {
        if bps != 1 || w % 2 != 0 {
            return Err(DecodeError::Unsupported(
                "YBR_FULL_422 with 16 bits or odd width".into(),
            ));
        }
        *photometric = "YBR_FULL".into();
        let mut out = Vec::with_capacity(w * h * 3);
        for quad in slice.chunks_exact(4) {
            let (y0, y1, cb, cr) = (quad[0], quad[1], quad[2], quad[3]);
            out.extend_from_slice(&[y0, cb, cr, y1, cb, cr]);
        }
        Ok(out)
    } else if spp == 3 && info.planar == 1 {
        // Planar Configuration 1: RRR..GGG..BBB.. → interleave.
        let plane = w * h * bps;
        let mut out = vec![0u8; slice.len()];
        for p in 0..w * h {
            for c in 0..3 {
                let src = c * plane + p * bps;
                let dst = (p * 3 + c) * bps;
                out[dst..dst + bps].copy_from_slice(&slice[src..src + bps]);
            }
        }
        Ok(out)
    } else {
        Ok(slice.to_vec())
    }
}

/// One frame of encapsulated pixel data through the registered codec.
fn encapsulated_frame(
    obj: &FileDicomObject<Obj>,
    info: &PixelInfo,
    frame: u32,
    photometric: &mut String,
) -> Result<Vec<u8>, DecodeError> {
    let spp = info.samples_per_pixel;
    // Encapsulated: hand over to the registered codec. Codecs are third-party
    // code fed untrusted bytes, so a panic inside one becomes an error here.
    let decoded = catch_unwind(AssertUnwindSafe(|| {
        obj.decode_pixel_data_frame(frame)
            .map(|d| d.data().to_vec())
    }))
    .map_err(|_| DecodeError::Codec("decoder panicked on this pixel data".into()))?
    .map_err(|e| DecodeError::Codec(e.to_string()))?;
    // dicom-pixeldata reports 3-sample codec output as RGB: JPEG and
    // JPEG 2000 codecs undo YCbCr/RCT/ICT themselves. RLE does not
    // transform colour (PS3.5 G), so YBR_FULL RLE data stays YBR_FULL.
    if spp == 3 {
        let keep_ybr = info.transfer_syntax == RLE_LOSSLESS && *photometric == "YBR_FULL";
        if !keep_ybr {
            *photometric = "RGB".into();
        }
    }
    Ok(decoded)
}

/// Modality LUT (PS3.3 C.11.1) applied in place: the Modality LUT Sequence
/// when present, else Rescale Slope/Intercept, taken per frame from the Pixel
/// Value Transformation functional group for enhanced objects.
fn apply_modality(obj: &Obj, frame: usize, v: &mut [f32]) {
    if let Some(lut) = attrs::item(obj, tags::MODALITY_LUT_SEQUENCE).and_then(Lut::from_item) {
        for x in v.iter_mut() {
            *x = lut.lookup(*x);
        }
        return;
    }
    let (mut slope, mut intercept) = (
        attrs::float(obj, tags::RESCALE_SLOPE),
        attrs::float(obj, tags::RESCALE_INTERCEPT),
    );
    if let Some(fg) = attrs::functional_group(obj, frame, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE)
    {
        slope = attrs::float(fg, tags::RESCALE_SLOPE).or(slope);
        intercept = attrs::float(fg, tags::RESCALE_INTERCEPT).or(intercept);
    }
    let slope = slope.filter(|s| *s != 0.0).unwrap_or(1.0) as f32;
    let intercept = intercept.unwrap_or(0.0) as f32;
    if slope != 1.0 || intercept != 0.0 {
        for x in v.iter_mut() {
            *x = *x * slope + intercept;
        }
    }
}

/// A LUT from a LUT Descriptor + LUT Data pair (PS3.3 C.11.1.1.1 / C.11.2.1.1).
pub(super) struct Lut {
    pub(super) first: i64,
    pub(super) data: Vec<f32>,
    pub(super) bits: u32,
}

impl Lut {
    fn from_item(item: &Obj) -> Option<Lut> {
        let desc = attrs::ints(item, tags::LUT_DESCRIPTOR);
        if desc.len() < 3 {
            return None;
        }
        // 0 entries means 65536 (C.11.1.1.1).
        let n = if desc[0] == 0 {
            65536
        } else {
            desc[0].rem_euclid(65536)
        } as usize;
        let first = desc[1];
        let bits = desc[2].clamp(1, 16) as u32;
        let raw = attrs::bytes(item, tags::LUT_DATA)?;
        let data = lut_words(&raw, n, bits)?;
        Some(Lut { first, data, bits })
    }
    pub(super) fn lookup(&self, x: f32) -> f32 {
        let i = (x.round() as i64 - self.first).clamp(0, self.data.len() as i64 - 1);
        self.data[i as usize]
    }
    /// Largest output value, for scaling to [0,1].
    fn out_max(&self) -> f32 {
        let nominal = ((1u64 << self.bits) - 1) as f32;
        let actual = self.data.iter().cloned().fold(0.0f32, f32::max);
        nominal.max(actual)
    }
}

/// LUT Data words: 16-bit entries, or 8-bit entries stored one per byte or one
/// per 16-bit word (both occur in the wild; PS3.3 C.7.6.3.1.6).
pub(super) fn lut_words(raw: &[u8], n: usize, bits: u32) -> Option<Vec<f32>> {
    if bits <= 8 && raw.len() == n {
        return Some(raw.iter().map(|&b| b as f32).collect());
    }
    if raw.len() < n * 2 {
        if bits <= 8 && raw.len() >= n {
            return Some(raw[..n].iter().map(|&b| b as f32).collect());
        }
        return None;
    }
    Some(
        raw.chunks_exact(2)
            .take(n)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as f32)
            .collect(),
    )
}

/// VOI LUT function of C.11.2.1.2.
#[derive(Clone, Copy, Debug, PartialEq)]
enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

/// VOI transform to [0,1] (C.11.2), or `None` when the object has none.
enum Voi {
    Window {
        center: f64,
        width: f64,
        function: VoiFunction,
    },
    Lut(Lut),
}

fn find_voi(obj: &Obj, frame: usize, choice: VoiWindowChoice) -> Option<Voi> {
    // Enhanced objects: Frame VOI LUT functional group first.
    let fg = attrs::functional_group(obj, frame, tags::FRAME_VOILUT_SEQUENCE);
    let src: &Obj = fg.unwrap_or(obj);
    if fg.is_none()
        && let Some(lut) = attrs::item(obj, tags::VOILUT_SEQUENCE).and_then(Lut::from_item)
    {
        return Some(Voi::Lut(lut));
    }
    let centers = attrs::floats(src, tags::WINDOW_CENTER);
    let widths = attrs::floats(src, tags::WINDOW_WIDTH);
    let n = centers.len().min(widths.len());
    if n == 0 {
        return None;
    }
    let idx = match choice {
        VoiWindowChoice::First => 0,
        VoiWindowChoice::Index(i) => i.min(n - 1),
        VoiWindowChoice::Widest => (0..n)
            .max_by(|&a, &b| widths[a].total_cmp(&widths[b]))
            .unwrap_or(0),
    };
    let function = match attrs::text(src, tags::VOILUT_FUNCTION).as_deref() {
        Some("LINEAR_EXACT") => VoiFunction::LinearExact,
        Some("SIGMOID") => VoiFunction::Sigmoid,
        _ => VoiFunction::Linear,
    };
    let width = widths[idx];
    // LINEAR requires width >= 1, the others width > 0 (C.11.2.1.2.1).
    let valid = match function {
        VoiFunction::Linear => width >= 1.0,
        _ => width > 0.0,
    };
    valid.then_some(Voi::Window {
        center: centers[idx],
        width,
        function,
    })
}

fn apply_window(x: f64, c: f64, w: f64, f: VoiFunction) -> f32 {
    let y = match f {
        // C.11.2.1.2.1
        VoiFunction::Linear => {
            if x <= c - 0.5 - (w - 1.0) / 2.0 {
                0.0
            } else if x > c - 0.5 + (w - 1.0) / 2.0 || w <= 1.0 {
                1.0
            } else {
                (x - (c - 0.5)) / (w - 1.0) + 0.5
            }
        }
        // C.11.2.1.3.2
        VoiFunction::LinearExact => {
            if x <= c - w / 2.0 {
                0.0
            } else if x > c + w / 2.0 {
                1.0
            } else {
                (x - c) / w + 0.5
            }
        }
        // C.11.2.1.3.1
        VoiFunction::Sigmoid => 1.0 / (1.0 + (-4.0 * (x - c) / w).exp()),
    };
    y.clamp(0.0, 1.0) as f32
}

/// Decode one frame to modality values (after the Modality LUT, before VOI):
/// the physically meaningful intensities used for MRI. Colour images are an
/// error here.
pub fn decode_modality(obj: &FileDicomObject<Obj>, frame: u32) -> Result<GrayImage, DecodeError> {
    let info = pixel_info(obj)?;
    let s = read_samples(obj, &info, frame)?;
    if s.channels != 1 || !s.photometric.starts_with("MONOCHROME") {
        return Err(DecodeError::NotGrayscale(s.photometric));
    }
    let mut v = s.values;
    apply_modality(obj, frame as usize, &mut v);
    Ok(GrayImage {
        width: s.width,
        height: s.height,
        data: v,
    })
}

/// Decode one frame to display grayscale in [0,1]:
/// - monochrome: Modality LUT → VOI (window or VOI LUT; without either, the
///   full stored range for ≤ 8-bit data, else the frame's min..max) →
///   inversion for MONOCHROME1;
/// - colour (RGB, YBR_*, PALETTE COLOR): RGB in [0,1] → ITU-R 601-2 luma.
pub fn decode_gray(
    obj: &FileDicomObject<Obj>,
    frame: u32,
    choice: VoiWindowChoice,
) -> Result<GrayImage, DecodeError> {
    let info = pixel_info(obj)?;
    let s = read_samples(obj, &info, frame)?;
    let (w, h) = (s.width, s.height);
    if s.channels == 1 && s.photometric.starts_with("MONOCHROME") {
        let mut v = s.values;
        let had_rescale = attrs::item(obj, tags::MODALITY_LUT_SEQUENCE).is_some()
            || attrs::float(obj, tags::RESCALE_SLOPE).is_some_and(|x| x != 1.0)
            || attrs::float(obj, tags::RESCALE_INTERCEPT).is_some_and(|x| x != 0.0);
        apply_modality(obj, frame as usize, &mut v);
        match find_voi(obj, frame as usize, choice) {
            Some(Voi::Lut(lut)) => {
                let m = lut.out_max().max(1.0);
                for x in v.iter_mut() {
                    *x = lut.lookup(*x) / m;
                }
            }
            Some(Voi::Window {
                center,
                width,
                function,
            }) => {
                for x in v.iter_mut() {
                    *x = apply_window(*x as f64, center, width, function);
                }
            }
            None => {
                let (lo, hi) = if info.bits_stored <= 8 && !had_rescale {
                    if info.signed {
                        let half = (1i64 << (info.bits_stored - 1)) as f32;
                        (-half, half - 1.0)
                    } else {
                        (0.0, ((1u32 << info.bits_stored) - 1) as f32)
                    }
                } else {
                    min_max(&v)
                };
                let range = (hi - lo).max(f32::EPSILON);
                for x in v.iter_mut() {
                    *x = ((*x - lo) / range).clamp(0.0, 1.0);
                }
            }
        }
        if s.photometric == "MONOCHROME1" {
            for x in v.iter_mut() {
                *x = 1.0 - *x;
            }
        }
        return Ok(GrayImage {
            width: w,
            height: h,
            data: v,
        });
    }
    let rgb = to_rgb(obj, &info, s)?;
    Ok(GrayImage {
        width: w,
        height: h,
        data: luma(&rgb.data),
    })
}

/// Decode one frame as RGB in [0,1] (grayscale is replicated): used to judge
/// whether an ultrasound frame is colour-Doppler dominated.
pub fn decode_rgb(obj: &FileDicomObject<Obj>, frame: u32) -> Result<RgbImage, DecodeError> {
    let info = pixel_info(obj)?;
    let s = read_samples(obj, &info, frame)?;
    if s.channels == 1 && s.photometric.starts_with("MONOCHROME") {
        let g = decode_gray(obj, frame, VoiWindowChoice::First)?;
        let data = g.data.iter().flat_map(|&v| [v, v, v]).collect();
        return Ok(RgbImage {
            width: g.width,
            height: g.height,
            data,
        });
    }
    to_rgb(obj, &info, s)
}

fn to_rgb(obj: &Obj, info: &PixelInfo, s: Samples) -> Result<RgbImage, DecodeError> {
    let (w, h) = (s.width, s.height);
    let max = ((1u64 << info.bits_stored) - 1) as f32;
    let data = match (s.channels, s.photometric.as_str()) {
        (3, "RGB") => s
            .values
            .iter()
            .map(|&x| (x / max).clamp(0.0, 1.0))
            .collect(),
        (3, "YBR_FULL") => {
            // C.7.6.3.1.2 YBR_FULL → RGB, chroma centred on half range.
            let half = (max + 1.0) / 2.0;
            let mut out = Vec::with_capacity(s.values.len());
            for p in s.values.chunks_exact(3) {
                let (y, cb, cr) = (p[0], p[1] - half, p[2] - half);
                let r = y + 1.402 * cr;
                let g = y - 0.344136 * cb - 0.714136 * cr;
                let b = y + 1.772 * cb;
                out.extend([r, g, b].map(|c| (c / max).clamp(0.0, 1.0)));
            }
            out
        }
        (1, "PALETTE COLOR") => super::palette::palette_to_rgb(obj, &s.values)?,
        (c, pi) => {
            return Err(DecodeError::Unsupported(format!(
                "photometric {pi} with {c} samples"
            )));
        }
    };
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// ITU-R 601-2 luma (PIL "L"): L = R·299/1000 + G·587/1000 + B·114/1000.
pub fn luma(rgb: &[f32]) -> Vec<f32> {
    rgb.chunks_exact(3)
        .map(|p| p[0] * 0.299 + p[1] * 0.587 + p[2] * 0.114)
        .collect()
}

/// Fraction of pixels whose chroma (max − min of R,G,B) exceeds `threshold`:
/// a B-mode image is gray, a colour-Doppler frame has large coloured areas.
pub fn chroma_fraction(rgb: &RgbImage, threshold: f32) -> f32 {
    let n = rgb.width * rgb.height;
    if n == 0 {
        return 0.0;
    }
    let coloured = rgb
        .data
        .chunks_exact(3)
        .filter(|p| p[0].max(p[1]).max(p[2]) - p[0].min(p[1]).min(p[2]) > threshold)
        .count();
    coloured as f32 / n as f32
}

pub(crate) fn min_max(v: &[f32]) -> (f32, f32) {
    v.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_window_matches_standard() {
        // C.11.2.1.2.1 example: c=2048, w=4096 maps 0 → 0 and 4095 → 1.
        assert_eq!(apply_window(-1.0, 2048.0, 4096.0, VoiFunction::Linear), 0.0);
        assert!((apply_window(4095.0, 2048.0, 4096.0, VoiFunction::Linear) - 1.0).abs() < 1e-3);
        assert!((apply_window(2047.5, 2048.0, 4096.0, VoiFunction::Linear) - 0.5).abs() < 1e-6);
        assert!((apply_window(2048.0, 2048.0, 100.0, VoiFunction::LinearExact) - 0.5).abs() < 1e-6);
        assert!((apply_window(2048.0, 2048.0, 100.0, VoiFunction::Sigmoid) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn luma_is_itu_601() {
        let l = luma(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
        assert!(
            (l[0] - 0.299).abs() < 1e-6
                && (l[1] - 0.587).abs() < 1e-6
                && (l[2] - 0.114).abs() < 1e-6
        );
    }
}
