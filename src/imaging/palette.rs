//! Palette Color images (PS3.3 C.7.6.3.1.5, C.7.9): stored indices to RGB
//! through the three LUTs, plain or segmented (C.7.9.2).

use dicom_dictionary_std::tags;

use super::attrs::{self, Obj};
use super::decode::{DecodeError, Lut, lut_words};

/// Palette Color LUT (PS3.3 C.7.6.3.1.5): stored value → (R,G,B) via three
/// descriptors + data; segmented palettes are not supported.
pub(super) fn palette_to_rgb(obj: &Obj, idx: &[f32]) -> Result<Vec<f32>, DecodeError> {
    let channel = |desc_tag, data_tag, seg_tag| -> Result<Lut, DecodeError> {
        let desc = attrs::ints(obj, desc_tag);
        if desc.len() < 3 {
            return Err(DecodeError::Attribute(
                "Palette Color Lookup Table Descriptor",
            ));
        }
        let n = if desc[0] == 0 {
            65536
        } else {
            desc[0].rem_euclid(65536)
        } as usize;
        let bits = desc[2].clamp(1, 16) as u32;
        let data = match attrs::bytes(obj, data_tag) {
            Some(raw) => lut_words(&raw, n, bits)
                .ok_or(DecodeError::Attribute("Palette Color Lookup Table Data"))?,
            None => {
                let raw = attrs::bytes(obj, seg_tag)
                    .ok_or(DecodeError::Attribute("Palette Color Lookup Table Data"))?;
                expand_segmented(&raw, n).ok_or(DecodeError::Attribute(
                    "Segmented Palette Color Lookup Table Data",
                ))?
            }
        };
        // 8-bit palette entries stored in 16-bit words carry the value in the
        // low byte; a 16-bit table is scaled by 65535.
        let bits = if bits <= 8 && data.iter().any(|&x| x > 255.0) {
            16
        } else {
            bits
        };
        Ok(Lut {
            first: desc[1],
            data,
            bits,
        })
    };
    let r = channel(
        tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )?;
    let g = channel(
        tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        tags::SEGMENTED_GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )?;
    let b = channel(
        tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        tags::SEGMENTED_BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )?;
    let (mr, mg, mb) = (
        ((1u64 << r.bits) - 1) as f32,
        ((1u64 << g.bits) - 1) as f32,
        ((1u64 << b.bits) - 1) as f32,
    );
    let mut out = Vec::with_capacity(idx.len() * 3);
    for &i in idx {
        out.push(r.lookup(i) / mr);
        out.push(g.lookup(i) / mg);
        out.push(b.lookup(i) / mb);
    }
    Ok(out)
}

/// Expand a Segmented Palette Color LUT (PS3.3 C.7.9.2): 16-bit words of
/// discrete (opcode 0), linear (1) and indirect (2) segments.
fn expand_segmented(raw: &[u8], n: usize) -> Option<Vec<f32>> {
    let w: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let mut out: Vec<f32> = Vec::with_capacity(n);
    let mut i = 0;
    // Guard against malicious loops in indirect segments.
    let mut depth = 0;
    while i + 1 < w.len() && out.len() < n {
        let (op, len) = (w[i], w[i + 1] as usize);
        match op {
            0 => {
                let seg = w.get(i + 2..i + 2 + len)?;
                out.extend(seg.iter().map(|&v| v as f32));
                i += 2 + len;
            }
            1 => {
                let y1 = *w.get(i + 2)? as f32;
                let y0 = *out.last()?;
                for k in 1..=len {
                    out.push(y0 + (y1 - y0) * k as f32 / len as f32);
                }
                i += 3;
            }
            2 => {
                // Indirect: copy `len` segments starting at a byte offset.
                depth += 1;
                if depth > 64 {
                    return None;
                }
                let off = *w.get(i + 2)? as usize | ((*w.get(i + 3)? as usize) << 16);
                let sub = raw.get(off..)?;
                let mut copied = expand_segmented_limited(sub, len)?;
                out.append(&mut copied);
                i += 4;
            }
            _ => return None,
        }
    }
    out.truncate(n);
    (out.len() == n).then_some(out)
}

/// Expand at most `segments` segments (used by indirect segments, which may
/// not themselves contain indirect segments).
fn expand_segmented_limited(raw: &[u8], segments: usize) -> Option<Vec<f32>> {
    let w: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let mut out: Vec<f32> = Vec::new();
    let mut i = 0;
    for _ in 0..segments {
        let (op, len) = (*w.get(i)?, *w.get(i + 1)? as usize);
        match op {
            0 => {
                out.extend(w.get(i + 2..i + 2 + len)?.iter().map(|&v| v as f32));
                i += 2 + len;
            }
            1 => {
                let y1 = *w.get(i + 2)? as f32;
                let y0 = out.last().copied().unwrap_or(y1);
                for k in 1..=len {
                    out.push(y0 + (y1 - y0) * k as f32 / len as f32);
                }
                i += 3;
            }
            _ => return None,
        }
    }
    Some(out)
}
