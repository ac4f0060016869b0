//! The MRI input: the DCE phases (pre-contrast and the chosen
//! post-contrast phase, PS3.3 C.8.3.1 / C.7.6.16), decoded once for both
//! sides, the enhancement ROI and the patient-aligned cube resampled from it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use regex::Regex;

use super::decode::{self};
use super::resize::Grid3;
use super::roi::{
    self, CentredRoi, DicomAnnotationRoi, EnhancementRoi, PatientBox, RoiProvider, VolumeTarget,
};
use super::select::{self, Kind, Phase, Stack};
use super::{
    ImagingSettings, InputGrid, InstanceError, InstanceMeta, Laterality, Modality, Part, Selection,
    SourceGeometry, Volume, open_full, scale_percentiles,
};

/// One file and the (frame, destination) pairs decoded from it.
type FileFrames<'a, T> = (&'a Path, Vec<(u32, T)>);

/// Decode every slice of a stack in parallel and hand each slice's modality
/// values to `put` with that slice's `slots` entry (one per slice, in stack
/// order: e.g. its disjoint part of an output buffer).
fn decode_stack<T: Send>(
    st: &Stack,
    slots: Vec<T>,
    put: impl Fn(T, &[f32]) + Sync,
) -> Result<(), InstanceError> {
    let (ny, nx) = (st.rows, st.cols);
    // Group slices by file so that a multi-frame (Enhanced MR) instance is
    // opened once.
    let mut groups: Vec<FileFrames<'_, T>> = Vec::new();
    let mut by_path: std::collections::HashMap<&Path, usize> = std::collections::HashMap::new();
    for (sl, slot) in st.slices.iter().zip(slots) {
        let g = *by_path.entry(sl.path.as_path()).or_insert_with(|| {
            groups.push((sl.path.as_path(), Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push((sl.frame, slot));
    }
    groups
        .into_par_iter()
        .try_for_each(|(path, frames)| -> Result<(), InstanceError> {
            let sop = st
                .slices
                .iter()
                .find(|s| s.path == path)
                .map(|s| s.sop_instance.clone());
            let err = |msg: String| InstanceError {
                file: path.to_path_buf(),
                sop_instance_uid: sop.clone(),
                message: msg,
            };
            let obj = open_full(path).map_err(err)?;
            frames.into_par_iter().try_for_each(|(frame, slot)| {
                let img = catch_unwind(AssertUnwindSafe(|| decode::decode_modality(&obj, frame)))
                    .map_err(|_| err("decoder panicked".into()))?
                    .map_err(|e| err(format!("frame {frame}: {e}")))?;
                if img.width != nx || img.height != ny {
                    return Err(err("slice size differs from the stack".into()));
                }
                put(slot, &img.data);
                Ok(())
            })
        })
}

/// Decode the slices of a stack into a (slice, row, col) grid of modality
/// values, in parallel, writing straight into the grid buffer.
/// The decoded MR phases of a case, kept between the two runs of an
/// unknown lesion side: the decode does not depend on the side, only the
/// ROI does. Used only for those two runs, so that a known side never holds
/// the decode longer than its own MRI preparation.
#[derive(Default)]
pub(super) struct MrDecodeCache(std::sync::Mutex<Option<MrDecoded>>);

#[derive(Clone)]
struct MrDecoded {
    /// The stacks decoded: the paths of their slices.
    key: (Vec<PathBuf>, Option<Vec<PathBuf>>),
    post: Arc<Grid3>,
    pre: Option<Result<Arc<Grid3>, InstanceError>>,
}

/// Decode the chosen phase and pool the pre-contrast one against it, or
/// take both from `cache` when an earlier run decoded the same stacks.
fn decode_mr(
    stack: &Stack,
    pre_stack: Option<&Stack>,
    cache: Option<&MrDecodeCache>,
) -> Result<MrDecoded, InstanceError> {
    let paths = |st: &Stack| st.slices.iter().map(|s| s.path.clone()).collect::<Vec<_>>();
    let key = (paths(stack), pre_stack.map(paths));
    // The second run takes the decode out: nothing holds it after that.
    let cached = cache
        .and_then(|c| c.0.lock().ok())
        .and_then(|mut held| held.take_if(|d| d.key == key));
    if let Some(d) = cached {
        return Ok(d);
    }
    let post = Arc::new(load_stack(stack)?);
    let pre = pre_stack.map(|p| load_pooled_subtraction(p, &post).map(Arc::new));
    let decoded = MrDecoded { key, post, pre };
    if let Some(mut held) = cache.and_then(|c| c.0.lock().ok()) {
        *held = Some(decoded.clone());
    }
    Ok(decoded)
}

fn load_stack(st: &Stack) -> Result<Grid3, InstanceError> {
    let (nz, ny, nx) = (st.slices.len(), st.rows, st.cols);
    let mut data = vec![0f32; nz * ny * nx];
    decode_stack(st, data.chunks_mut(ny * nx).collect(), |dst, v| {
        dst.copy_from_slice(v)
    })?;
    Ok(Grid3 {
        shape: [nz, ny, nx],
        data,
    })
}

/// The pre-contrast phase as the enhancement ROI needs it: post − pre pooled
/// in-plane (`roi::pool_slice`), slice by slice as each pre slice is
/// decoded, so the pre phase is never held at full resolution.
fn load_pooled_subtraction(st: &Stack, post: &Grid3) -> Result<Grid3, InstanceError> {
    let [nz, ny, nx] = post.shape;
    let (f, py, px) = roi::pool_grid(ny, nx);
    let mut data = vec![0f32; nz * py * px];
    let slots = data
        .chunks_mut(py * px)
        .zip(post.data.chunks(ny * nx))
        .collect();
    decode_stack(st, slots, |(plane, post), pre| {
        roi::pool_slice(post, Some(pre), nx, f, px, plane)
    })?;
    Ok(Grid3 {
        shape: [nz, py, px],
        data,
    })
}

/// The MRI input of a case: the chosen DCE phase (and the pre-contrast
/// phase for the subtraction the ROI looks at), the ROI, and the cube
/// resampled around it. Never panics; problems become errors and notes.
pub(super) fn prepare_mri(
    metas: &[InstanceMeta],
    s: &ImagingSettings,
    grid: InputGrid,
    side: Option<Laterality>,
    ann: Option<&DicomAnnotationRoi>,
    cache: Option<&MrDecodeCache>,
) -> Part<Volume> {
    let (mut errors, mut notes) = (Vec::new(), Vec::new());
    let Some(chosen) = choose_phases(metas, s, &mut notes) else {
        return (None, vec![], errors, notes);
    };
    // Only two phases are ever decoded, and only the chosen one is held at
    // full resolution (memory: see docs/imaging.md); the pre phase is pooled
    // against it as it is decoded, so it comes second.
    let (post, pre) = match decode_mr(&chosen.stack, chosen.pre_stack.as_ref(), cache) {
        Ok(d) => (d.post, d.pre),
        Err(e) => {
            errors.push(e);
            notes.push("MR: chosen phase could not be decoded; MRI input left out".into());
            return (None, vec![], errors, notes);
        }
    };
    let pre = match pre {
        Some(Ok(g)) => Some(g),
        Some(Err(e)) => {
            errors.push(e);
            notes.push("MR: pre-contrast phase could not be decoded; no subtraction".into());
            None
        }
        None => None,
    };
    let target = VolumeTarget {
        stack: &chosen.stack,
        post: &post,
        pooled_subtraction: pre.as_deref(),
        side,
    };
    let (provider, center, side_mm) = mri_roi(&target, s, ann);
    let n = grid.mri;
    let mut data = resample_cube(&chosen.stack, &post, center, side_mm, n);
    // Freed here unless the other side's run will take them from the cache.
    drop(pre);
    drop(post);
    scale_percentiles(&mut data, s.mri_percentile_low, s.mri_percentile_high);
    let cube = (center, side_mm, provider);
    let mut sels = vec![volume_selection(
        format!("MR post-contrast {}", chosen.index + 1),
        &chosen.post_phase,
        &chosen.stack,
        cube,
    )];
    if let (Some(p), Some(pst)) = (&chosen.pre_phase, &chosen.pre_stack) {
        sels.push(volume_selection(
            "MR pre-contrast (subtraction)".into(),
            p,
            pst,
            cube,
        ));
    }
    (
        Some(Volume {
            shape: [n, n, n],
            data,
        }),
        sels,
        errors,
        notes,
    )
}

/// The phases a case's MRI input is made of.
struct ChosenPhases {
    /// 0-based index of the chosen post-contrast phase.
    index: usize,
    post_phase: Phase,
    stack: Stack,
    pre_phase: Option<Phase>,
    /// The pre-contrast stack, only when it shares the chosen phase's grid.
    pre_stack: Option<Stack>,
}

/// The DCE phases (PS3.3 C.8.3.1 Temporal Position, series descriptions):
/// the configured post-contrast phase, and the pre-contrast phase when it
/// can be subtracted voxel by voxel. `None` (with a note) when there is no
/// usable post-contrast phase.
fn choose_phases(
    metas: &[InstanceMeta],
    s: &ImagingSettings,
    notes: &mut Vec<String>,
) -> Option<ChosenPhases> {
    let no_geom = metas
        .iter()
        .filter(|m| {
            m.kind == Kind::Image(Modality::MR)
                && m.geom.is_none()
                && !m.frame_geoms.iter().any(|g| g.0.is_some())
        })
        .count();
    if no_geom > 0 {
        notes.push(format!(
            "MR: {no_geom} instance(s) without Image Position/Orientation ignored"
        ));
    }
    let phases = select::mr_phases(metas);
    if phases.is_empty() {
        return None;
    }
    let compile = |pats: &[String], notes: &mut Vec<String>| -> Vec<Regex> {
        pats.iter()
            .filter_map(|p| match Regex::new(p) {
                Ok(r) => Some(r),
                Err(e) => {
                    notes.push(format!("MR: invalid series-description pattern {p:?}: {e}"));
                    None
                }
            })
            .collect()
    };
    let pre_pats = compile(&s.mri_pre_patterns, notes);
    let post_pats = compile(&s.mri_post_patterns, notes);
    let mut dce = select::detect_dce(phases, &pre_pats, &post_pats);
    notes.extend(dce.notes.iter().cloned());
    if dce.post.is_empty() {
        notes.push(format!("MR: no post-contrast phase ({})", dce.rule));
        return None;
    }
    let want = s.mri_post_contrast_phase.max(1);
    let idx = want.min(dce.post.len()) - 1;
    if idx + 1 != want {
        notes.push(format!(
            "MR: post-contrast phase {want} requested, only {} present; phase {} used",
            dce.post.len(),
            idx + 1
        ));
    }
    notes.push(format!(
        "MR: pre-contrast by {}; {} post-contrast phase(s); post-contrast phase {} used",
        dce.rule,
        dce.post.len(),
        idx + 1
    ));
    let post_phase = dce.post.swap_remove(idx);
    let Some(stack) = select::stack_phase(&post_phase) else {
        notes.push("MR: chosen phase has no usable slice geometry".into());
        return None;
    };
    notes.extend(stack.notes.iter().cloned());
    let pre_stack = dce.pre.as_ref().and_then(select::stack_phase);
    // Subtraction needs the same voxel grid; otherwise skip the pre phase
    // entirely (never decoded).
    let pre_stack = pre_stack.filter(|p| {
        let same = p.slices.len() == stack.slices.len()
            && p.rows == stack.rows
            && p.cols == stack.cols
            && (0..3).all(|a| (p.origin[a] - stack.origin[a]).abs() < 1.0);
        if !same {
            notes
                .push("MR: pre-contrast grid differs from the chosen phase; no subtraction".into());
        }
        same
    });
    Some(ChosenPhases {
        index: idx,
        post_phase,
        stack,
        pre_phase: dce.pre,
        pre_stack,
    })
}

/// The MRI ROI: a DICOM annotation, else the enhancement of the
/// subtraction (when image-derived ROIs are on), else the centred fallback.
/// Returns the provider's name, the cube's centre (patient mm) and side.
fn mri_roi(
    target: &VolumeTarget<'_>,
    s: &ImagingSettings,
    ann: Option<&DicomAnnotationRoi>,
) -> (&'static str, [f64; 3], f64) {
    let mut providers: Vec<&dyn RoiProvider> = Vec::new();
    if let Some(a) = ann {
        providers.push(a);
    }
    if s.roi_image_derived {
        providers.push(&EnhancementRoi);
    }
    let found = providers
        .iter()
        .find_map(|p| p.volume(target).map(|b| (p.name(), b)));
    match found {
        Some((name, b)) => {
            let e = b.extent();
            let longest = e[0].max(e[1]).max(e[2]);
            (
                name,
                b.center(),
                (longest * s.mri_roi_margin).max(s.mri_min_crop_mm),
            )
        }
        None => {
            let b = CentredRoi.volume(target).unwrap_or(PatientBox {
                min: [0.0; 3],
                max: [0.0; 3],
            });
            ("centred", b.center(), s.mri_fallback_crop_mm)
        }
    }
}

/// The input cube: `n`³ samples of the chosen phase at the centres of a
/// patient-aligned cube of side `side_mm` around `center` (trilinear).
fn resample_cube(
    stack: &Stack,
    post: &Grid3,
    center: [f64; 3],
    side_mm: f64,
    n: usize,
) -> Vec<f32> {
    let mut data = vec![0f32; n * n * n];
    data.par_chunks_mut(n * n)
        .enumerate()
        .for_each(|(k, plane)| {
            let off = |i: usize| ((i as f64 + 0.5) / n as f64 - 0.5) * side_mm;
            for j in 0..n {
                for i in 0..n {
                    let p = [center[0] + off(i), center[1] + off(j), center[2] + off(k)];
                    let v = stack.to_voxel(p);
                    plane[j * n + i] = post.sample(v[0], v[1], v[2]);
                }
            }
        });
    data
}

/// The selection of one MR stack used for the input, with the cube's
/// geometry so that its CAM can be drawn on the stack's slices.
fn volume_selection(
    role: String,
    phase: &Phase,
    stack: &Stack,
    (center, side_mm, provider): ([f64; 3], f64, &str),
) -> Selection {
    Selection {
        modality: Modality::MR,
        role,
        study_instance_uid: phase.study_uid.clone(),
        series_instance_uid: phase.series_uid.clone(),
        sop_instance_uids: stack
            .slices
            .iter()
            .map(|s| s.sop_instance.clone())
            .collect(),
        geometry: SourceGeometry::Volume {
            slices: stack.slices.len(),
            rows: stack.rows,
            cols: stack.cols,
            frames: stack.slices.iter().map(|s| s.frame).collect(),
            origin: stack.origin,
            row_dir: stack.row_dir,
            col_dir: stack.col_dir,
            normal: stack.normal,
            spacing: stack.spacing,
            box_center_mm: center,
            box_side_mm: side_mm,
        },
        roi_provider: provider.into(),
        heatmap_base: None,
    }
}
