//! Selection: which stored instances feed the model. Reads headers only
//! (up to Pixel Data), classifies instances (MG / US / MR / ROI objects),
//! picks the mammography views and the ultrasound image of the lesion side,
//! detects the DCE-MRI phases and stacks the chosen phase's slices.
//!
//! DICOM references: PS3.3 C.8.11.7 Mammography Image module (View Code
//! Sequence, Image Laterality), C.7.3.1 General Series (Laterality), C.8.5.5
//! US Region Calibration, C.7.6.2 Image Plane (Image Position/Orientation
//! Patient, Pixel Spacing), C.8.3.1 MR Image (Temporal Position Identifier),
//! C.7.6.16 multi-frame functional groups (Enhanced MR).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use regex::Regex;

use super::attrs::{self, Obj};
use crate::header::classify;
pub use crate::header::{Kind, Laterality, MgView, laterality_term, view_term};
use crate::modality::Modality;

pub use crate::header::{
    SOP_ENHANCED_MR, SOP_GSPS, SOP_MG_PRESENTATION, SOP_MG_PROCESSING, SOP_MR, SOP_SEG, SOP_US,
    SOP_US_MULTIFRAME,
};

/// One ultrasound region (PS3.3 C.8.5.5.1).
#[derive(Clone, Debug)]
pub struct UsRegion {
    pub data_type: i64,
    pub spatial_format: i64,
    pub x0: i64,
    pub y0: i64,
    pub x1: i64,
    pub y1: i64,
}

/// Position and orientation of one 2-D slice (PS3.3 C.7.6.2).
#[derive(Clone, Copy, Debug)]
pub struct SliceGeom {
    pub position: [f64; 3],
    pub row_dir: [f64; 3],
    pub col_dir: [f64; 3],
    /// (spacing between rows, spacing between columns) in mm
    pub spacing: [f64; 2],
}

impl SliceGeom {
    pub fn normal(&self) -> [f64; 3] {
        normalize(cross(self.row_dir, self.col_dir))
    }
    /// Patient coordinates of pixel (column x, row y), pixel centres at integers.
    pub fn to_patient(&self, x: f64, y: f64) -> [f64; 3] {
        let mut p = self.position;
        for (a, v) in p.iter_mut().enumerate() {
            *v += self.row_dir[a] * x * self.spacing[1] + self.col_dir[a] * y * self.spacing[0];
        }
        p
    }
}

/// Header facts about one instance (no pixel data held).
#[derive(Clone, Debug)]
pub struct InstanceMeta {
    pub path: PathBuf,
    pub kind: Kind,
    pub sop_class: String,
    pub sop_instance: String,
    pub study_uid: String,
    pub series_uid: String,
    pub modality: String,
    pub laterality: Option<Laterality>,
    pub view: Option<MgView>,
    pub view_from_code: bool,
    pub has_view_modifier: bool,
    pub for_presentation: bool,
    pub image_type: Vec<String>,
    pub series_description: String,
    pub series_number: i64,
    pub instance_number: i64,
    pub series_time: Option<f64>,
    pub acquisition_time: Option<f64>,
    pub content_time: Option<f64>,
    pub temporal_position: Option<i64>,
    pub contrast_agent: Option<String>,
    pub rows: usize,
    pub cols: usize,
    pub frames: u32,
    pub representative_frame: Option<u32>,
    pub us_regions: Vec<UsRegion>,
    /// Single-frame geometry (classic MR, or first frame of enhanced).
    pub geom: Option<SliceGeom>,
    /// Per-frame geometry and temporal index of an enhanced multi-frame MR.
    pub frame_geoms: Vec<(Option<SliceGeom>, Option<i64>)>,
    pub pixel_spacing_mm: Option<f64>,
    /// Header data set (up to Pixel Data): clinical mapping and ROI objects.
    pub header: Obj,
}

/// Read the header of one file (stops before Pixel Data).
pub fn read_instance_meta(path: &Path) -> Result<InstanceMeta, String> {
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| format!("cannot read DICOM file: {e}"))?;
    let sop_class = attrs::text(&obj, tags::SOP_CLASS_UID).unwrap_or_else(|| {
        obj.meta()
            .media_storage_sop_class_uid()
            .trim_end_matches('\0')
            .to_string()
    });
    let sop_instance = attrs::text(&obj, tags::SOP_INSTANCE_UID).unwrap_or_else(|| {
        obj.meta()
            .media_storage_sop_instance_uid()
            .trim_end_matches('\0')
            .to_string()
    });
    let modality = attrs::text(&obj, tags::MODALITY)
        .unwrap_or_default()
        .to_ascii_uppercase();
    let kind = classify(&sop_class, &modality);
    let header: Obj = obj.into_inner();
    let o = &header;

    let laterality = laterality_term(o).and_then(|s| Laterality::from_code(&s));
    let (view, view_from_code) = mg_view(o);
    let intent = attrs::text(o, tags::PRESENTATION_INTENT_TYPE).unwrap_or_default();
    let for_presentation = sop_class == SOP_MG_PRESENTATION
        || (sop_class != SOP_MG_PROCESSING && !intent.eq_ignore_ascii_case("FOR PROCESSING"));
    let time =
        |d, t| attrs::date_time_seconds(attrs::text(o, d).as_deref(), attrs::text(o, t).as_deref());
    let acquisition_time = time(tags::ACQUISITION_DATE, tags::ACQUISITION_TIME).or_else(|| {
        attrs::text(o, tags::ACQUISITION_DATE_TIME).and_then(|s| attrs::dt_seconds(&s))
    });
    let us_regions = attrs::items(o, tags::SEQUENCE_OF_ULTRASOUND_REGIONS)
        .iter()
        .map(|r| UsRegion {
            data_type: attrs::int(r, tags::REGION_DATA_TYPE).unwrap_or(0),
            spatial_format: attrs::int(r, tags::REGION_SPATIAL_FORMAT).unwrap_or(0),
            x0: attrs::int(r, tags::REGION_LOCATION_MIN_X0).unwrap_or(0),
            y0: attrs::int(r, tags::REGION_LOCATION_MIN_Y0).unwrap_or(0),
            x1: attrs::int(r, tags::REGION_LOCATION_MAX_X1).unwrap_or(0),
            y1: attrs::int(r, tags::REGION_LOCATION_MAX_Y1).unwrap_or(0),
        })
        .collect();
    let frames = attrs::int(o, tags::NUMBER_OF_FRAMES)
        .unwrap_or(1)
        .clamp(1, u32::MAX as i64) as u32;
    let geom = slice_geom(o, None).or_else(|| slice_geom(o, Some(0)));
    let mut frame_geoms = Vec::new();
    if attrs::item(o, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).is_some()
        || !attrs::items(o, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).is_empty()
    {
        for f in 0..frames as usize {
            let tpi = attrs::functional_group(o, f, tags::FRAME_CONTENT_SEQUENCE)
                .and_then(|fc| attrs::int(fc, tags::TEMPORAL_POSITION_INDEX));
            frame_geoms.push((slice_geom(o, Some(f)), tpi));
        }
    }
    let pixel_spacing_mm = attrs::floats(o, tags::PIXEL_SPACING)
        .first()
        .copied()
        .or_else(|| attrs::float(o, tags::IMAGER_PIXEL_SPACING))
        .filter(|v| *v > 0.0);
    Ok(InstanceMeta {
        path: path.to_path_buf(),
        kind,
        sop_class,
        sop_instance,
        study_uid: attrs::text(o, tags::STUDY_INSTANCE_UID).unwrap_or_default(),
        series_uid: attrs::text(o, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
        modality,
        laterality,
        view,
        view_from_code,
        has_view_modifier: !attrs::items(o, tags::VIEW_MODIFIER_CODE_SEQUENCE).is_empty(),
        for_presentation,
        image_type: attrs::texts_upper(o, tags::IMAGE_TYPE),
        series_description: attrs::text(o, tags::SERIES_DESCRIPTION).unwrap_or_default(),
        series_number: attrs::int(o, tags::SERIES_NUMBER).unwrap_or(0),
        instance_number: attrs::int(o, tags::INSTANCE_NUMBER).unwrap_or(0),
        series_time: time(tags::SERIES_DATE, tags::SERIES_TIME),
        acquisition_time,
        content_time: time(tags::CONTENT_DATE, tags::CONTENT_TIME),
        temporal_position: attrs::int(o, tags::TEMPORAL_POSITION_IDENTIFIER),
        contrast_agent: attrs::text(o, tags::CONTRAST_BOLUS_AGENT),
        rows: attrs::int(o, tags::ROWS).unwrap_or(0).max(0) as usize,
        cols: attrs::int(o, tags::COLUMNS).unwrap_or(0).max(0) as usize,
        frames,
        representative_frame: attrs::int(o, tags::REPRESENTATIVE_FRAME_NUMBER)
            .filter(|v| *v >= 1)
            .map(|v| v as u32),
        us_regions,
        geom,
        frame_geoms,
        pixel_spacing_mm,
        header,
    })
}

/// The view, when it is one the model takes (CC or MLO).
fn mg_view(o: &Obj) -> (Option<MgView>, bool) {
    match view_term(o) {
        Some((t, from_code)) if t == "CC" => (Some(MgView::Cc), from_code),
        Some((t, from_code)) if t == "MLO" => (Some(MgView::Mlo), from_code),
        _ => (None, false),
    }
}

/// Image plane of a classic image (`frame = None`) or of one frame of an
/// enhanced image (Plane Position / Plane Orientation / Pixel Measures
/// functional groups).
fn slice_geom(o: &Obj, frame: Option<usize>) -> Option<SliceGeom> {
    let (pos, ori, sp) = match frame {
        None => (
            attrs::floats(o, tags::IMAGE_POSITION_PATIENT),
            attrs::floats(o, tags::IMAGE_ORIENTATION_PATIENT),
            attrs::floats(o, tags::PIXEL_SPACING),
        ),
        Some(f) => (
            attrs::functional_group(o, f, tags::PLANE_POSITION_SEQUENCE)
                .map(|g| attrs::floats(g, tags::IMAGE_POSITION_PATIENT))
                .unwrap_or_default(),
            attrs::functional_group(o, f, tags::PLANE_ORIENTATION_SEQUENCE)
                .map(|g| attrs::floats(g, tags::IMAGE_ORIENTATION_PATIENT))
                .unwrap_or_default(),
            attrs::functional_group(o, f, tags::PIXEL_MEASURES_SEQUENCE)
                .map(|g| attrs::floats(g, tags::PIXEL_SPACING))
                .unwrap_or_default(),
        ),
    };
    if pos.len() < 3 || ori.len() < 6 {
        return None;
    }
    let row_dir = normalize([ori[0], ori[1], ori[2]]);
    let col_dir = normalize([ori[3], ori[4], ori[5]]);
    if norm(cross(row_dir, col_dir)) < 0.5 {
        return None;
    }
    let spacing = if sp.len() >= 2 && sp[0] > 0.0 && sp[1] > 0.0 {
        [sp[0], sp[1]]
    } else {
        [1.0, 1.0]
    };
    Some(SliceGeom {
        position: [pos[0], pos[1], pos[2]],
        row_dir,
        col_dir,
        spacing,
    })
}

pub fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}
pub fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
pub fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}
pub fn normalize(a: [f64; 3]) -> [f64; 3] {
    let n = norm(a);
    if n > 0.0 {
        [a[0] / n, a[1] / n, a[2] / n]
    } else {
        a
    }
}

// ---------------------------------------------------------------- MG -----

/// The chosen image for one mammography view.
pub struct MgPick<'a> {
    pub meta: &'a InstanceMeta,
    pub note: Option<String>,
}

/// Pick CC and MLO of `side`: For Presentation first (For Processing only
/// when no presentation image of that view exists), then images without a
/// View Modifier (spot/magnification), then the latest acquisition/content
/// time, then the highest Instance Number.
pub fn select_mg(index: &[InstanceMeta], side: Laterality) -> [Option<MgPick<'_>>; 2] {
    [MgView::Cc, MgView::Mlo].map(|view| {
        let mut c: Vec<&InstanceMeta> = index
            .iter()
            .filter(|m| {
                m.kind == Kind::Image(Modality::MG)
                    && m.laterality == Some(side)
                    && m.view == Some(view)
            })
            .collect();
        c.sort_by(|a, b| {
            (b.for_presentation, !b.has_view_modifier)
                .cmp(&(a.for_presentation, !a.has_view_modifier))
                .then_with(|| {
                    let ta = a.acquisition_time.or(a.content_time).unwrap_or(f64::MIN);
                    let tb = b.acquisition_time.or(b.content_time).unwrap_or(f64::MIN);
                    tb.total_cmp(&ta)
                })
                .then_with(|| b.instance_number.cmp(&a.instance_number))
        });
        c.first().map(|m| MgPick {
            meta: m,
            note: (!m.for_presentation)
                .then(|| format!("MG {view:?}: no For Presentation image, using For Processing")),
        })
    })
}

// ---------------------------------------------------------------- US -----

/// True when the header says the instance is Doppler / colour flow
/// (`header::us_doppler`).
pub fn us_flagged_doppler(m: &InstanceMeta) -> bool {
    crate::header::us_doppler(m.us_regions.iter().map(|r| r.data_type), &m.image_type)
}

/// Ordered ultrasound candidates for `side` (`None`: any side): instances of
/// that laterality (or, when no US instance carries laterality, all), not
/// flagged as Doppler, single-frame before multi-frame, then by Series
/// Number, Instance Number, SOP Instance UID.
pub fn us_candidates(index: &[InstanceMeta], side: Option<Laterality>) -> Vec<&InstanceMeta> {
    let us: Vec<&InstanceMeta> = index
        .iter()
        .filter(|m| m.kind == Kind::Image(Modality::US))
        .collect();
    let any_lat = us.iter().any(|m| m.laterality.is_some());
    let mut c: Vec<&InstanceMeta> = us
        .into_iter()
        .filter(|m| match side {
            Some(s) if any_lat => m.laterality == Some(s),
            _ => true,
        })
        .filter(|m| !us_flagged_doppler(m))
        .collect();
    c.sort_by(|a, b| {
        (
            a.frames > 1,
            a.series_number,
            a.instance_number,
            &a.sop_instance,
        )
            .cmp(&(
                b.frames > 1,
                b.series_number,
                b.instance_number,
                &b.sop_instance,
            ))
    });
    c
}

/// The B-mode tissue region (first 2-D region of data type tissue, PS3.3
/// C.8.5.5.1.1/2) as a pixel box (x0, y0, x1, y1), exclusive end.
pub fn us_tissue_region(m: &InstanceMeta) -> Option<(usize, usize, usize, usize)> {
    m.us_regions
        .iter()
        .find(|r| r.spatial_format == 1 && r.data_type == 1)
        .and_then(|r| {
            let x0 = r.x0.clamp(0, m.cols as i64) as usize;
            let y0 = r.y0.clamp(0, m.rows as i64) as usize;
            let x1 = (r.x1 + 1).clamp(0, m.cols as i64) as usize;
            let y1 = (r.y1 + 1).clamp(0, m.rows as i64) as usize;
            (x1 > x0 + 8 && y1 > y0 + 8).then_some((x0, y0, x1, y1))
        })
}

// ---------------------------------------------------------------- MR -----

/// A reference to one MR slice: a classic instance or one frame of an
/// enhanced instance.
#[derive(Clone, Debug)]
pub struct SliceRef {
    pub path: PathBuf,
    pub sop_instance: String,
    pub frame: u32,
    pub geom: SliceGeom,
    pub rows: usize,
    pub cols: usize,
    pub instance_number: i64,
}

/// One DCE phase: the slices of one acquisition at one time point.
#[derive(Clone, Debug)]
pub struct Phase {
    pub series_uid: String,
    pub study_uid: String,
    pub description: String,
    pub series_number: i64,
    pub time: Option<f64>,
    pub temporal_position: Option<i64>,
    pub contrast_agent: bool,
    pub slices: Vec<SliceRef>,
}

/// Result of DCE phase detection.
#[derive(Debug)]
pub struct DcePhases {
    pub pre: Option<Phase>,
    pub post: Vec<Phase>,
    /// How pre-contrast was identified.
    pub rule: String,
    pub notes: Vec<String>,
}

/// Group MR slices into phases: by Series Instance UID, split further by
/// Temporal Position Identifier (classic) or Temporal Position Index
/// (enhanced, per frame) when a series holds several time points.
pub fn mr_phases(index: &[InstanceMeta]) -> Vec<Phase> {
    let mut groups: BTreeMap<(String, i64), Phase> = BTreeMap::new();
    for m in index.iter().filter(|m| m.kind == Kind::Image(Modality::MR)) {
        let mut push = |frame: u32, geom: SliceGeom, tp: Option<i64>| {
            let key = (m.series_uid.clone(), tp.unwrap_or(i64::MIN));
            let ph = groups.entry(key).or_insert_with(|| Phase {
                series_uid: m.series_uid.clone(),
                study_uid: m.study_uid.clone(),
                description: m.series_description.clone(),
                series_number: m.series_number,
                time: None,
                temporal_position: tp,
                contrast_agent: false,
                slices: Vec::new(),
            });
            let t = m.acquisition_time.or(m.series_time).or(m.content_time);
            ph.time = match (ph.time, t) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            ph.contrast_agent |= m.contrast_agent.is_some();
            ph.slices.push(SliceRef {
                path: m.path.clone(),
                sop_instance: m.sop_instance.clone(),
                frame,
                geom,
                rows: m.rows,
                cols: m.cols,
                instance_number: m.instance_number,
            });
        };
        if m.frames > 1 && !m.frame_geoms.is_empty() {
            for (f, (g, tp)) in m.frame_geoms.iter().enumerate() {
                if let Some(g) = g {
                    push(f as u32, *g, tp.or(m.temporal_position));
                }
            }
        } else if let Some(g) = m.geom {
            push(0, g, m.temporal_position);
        }
    }
    groups.into_values().collect()
}

/// Detect pre- and post-contrast phases among MR phases.
///
/// Rule (docs/imaging.md): 1. keep the DCE set = the phases sharing the most
/// common (rows, cols, slice count, orientation) signature; 2. order by
/// Temporal Position, else acquisition/series time, else Series Number;
/// 3. pre-contrast = phases whose Series Description matches a `pre`
/// pattern; else phases without Contrast/Bolus Agent when others have one;
/// else the earliest phase; 4. post-contrast = the later phases in order
/// (a phase matching a `post` pattern is never taken as pre).
pub fn detect_dce(
    phases: Vec<Phase>,
    pre_patterns: &[Regex],
    post_patterns: &[Regex],
) -> DcePhases {
    let mut notes = Vec::new();
    let sig = |p: &Phase| -> (usize, usize, usize, [i64; 3]) {
        let (r, c) = p.slices.first().map(|s| (s.rows, s.cols)).unwrap_or((0, 0));
        let n = p
            .slices
            .first()
            .map(|s| s.geom.normal())
            .unwrap_or([0.0; 3]);
        (r, c, p.slices.len(), n.map(|v| (v * 10.0).round() as i64))
    };
    let mut counts: BTreeMap<(usize, usize, usize, [i64; 3]), usize> = BTreeMap::new();
    for p in &phases {
        *counts.entry(sig(p)).or_default() += 1;
    }
    let Some((best, _)) = counts.iter().max_by_key(|(k, v)| (**v, k.2)) else {
        return DcePhases {
            pre: None,
            post: Vec::new(),
            rule: "no MR phases".into(),
            notes,
        };
    };
    let best = *best;
    let mut dce: Vec<Phase> = phases.into_iter().filter(|p| sig(p) == best).collect();
    let all_tp = dce.iter().all(|p| p.temporal_position.is_some());
    let all_time = dce.iter().all(|p| p.time.is_some());
    dce.sort_by(|a, b| {
        if all_tp {
            a.temporal_position.cmp(&b.temporal_position)
        } else if all_time {
            a.time.unwrap_or(0.0).total_cmp(&b.time.unwrap_or(0.0))
        } else {
            a.series_number.cmp(&b.series_number)
        }
        .then_with(|| a.series_number.cmp(&b.series_number))
    });
    let order = if all_tp {
        "temporal position"
    } else if all_time {
        "acquisition/series time"
    } else {
        "series number"
    };
    let matches = |p: &Phase, pats: &[Regex]| pats.iter().any(|r| r.is_match(&p.description));
    let pre_by_desc: Vec<usize> = (0..dce.len())
        .filter(|&i| matches(&dce[i], pre_patterns) && !matches(&dce[i], post_patterns))
        .collect();
    let (pre_idx, rule) = if let Some(&i) = pre_by_desc.first() {
        (
            Some(i),
            format!("series description pattern; phases ordered by {order}"),
        )
    } else if dce.iter().any(|p| p.contrast_agent) && dce.iter().any(|p| !p.contrast_agent) {
        (
            dce.iter().position(|p| !p.contrast_agent),
            format!("Contrast/Bolus Agent absent; phases ordered by {order}"),
        )
    } else if dce.len() > 1 && !matches(&dce[0], post_patterns) {
        (
            Some(0),
            format!("earliest phase; phases ordered by {order}"),
        )
    } else {
        (
            None,
            format!("no pre-contrast phase found; phases ordered by {order}"),
        )
    };
    if dce.len() < 2 {
        notes.push(format!("MR: only {} DCE phase(s) found", dce.len()));
    }
    let mut pre = None;
    let mut post = Vec::new();
    for (i, p) in dce.into_iter().enumerate() {
        match pre_idx {
            Some(pi) if i == pi => pre = Some(p),
            Some(pi) if i < pi => notes.push(format!(
                "MR: phase '{}' precedes pre-contrast; ignored",
                p.description
            )),
            _ => post.push(p),
        }
    }
    DcePhases {
        pre,
        post,
        rule,
        notes,
    }
}

/// A phase's slices sorted along the slice normal, with the geometry of the
/// stack. Slices whose orientation differs from the majority are dropped and
/// duplicates at one position keep the lowest Instance Number.
#[derive(Clone, Debug)]
pub struct Stack {
    pub slices: Vec<SliceRef>,
    pub origin: [f64; 3],
    pub row_dir: [f64; 3],
    pub col_dir: [f64; 3],
    pub normal: [f64; 3],
    /// (slice, row, column) spacing in mm
    pub spacing: [f64; 3],
    pub rows: usize,
    pub cols: usize,
    pub notes: Vec<String>,
}

impl Stack {
    /// Patient coordinates of continuous voxel (z = slice, y = row, x = col).
    pub fn to_patient(&self, z: f64, y: f64, x: f64) -> [f64; 3] {
        let mut p = self.origin;
        for (a, v) in p.iter_mut().enumerate() {
            *v += self.row_dir[a] * x * self.spacing[2]
                + self.col_dir[a] * y * self.spacing[1]
                + self.normal[a] * z * self.spacing[0];
        }
        p
    }
    /// Continuous voxel (z, y, x) of a patient point.
    pub fn to_voxel(&self, p: [f64; 3]) -> [f64; 3] {
        let d = [
            p[0] - self.origin[0],
            p[1] - self.origin[1],
            p[2] - self.origin[2],
        ];
        [
            dot(d, self.normal) / self.spacing[0],
            dot(d, self.col_dir) / self.spacing[1],
            dot(d, self.row_dir) / self.spacing[2],
        ]
    }
}

pub fn stack_phase(phase: &Phase) -> Option<Stack> {
    let mut notes = Vec::new();
    let first = phase.slices.first()?;
    // Majority orientation (rounded direction cosines).
    let key = |s: &SliceRef| {
        let mut k = [0i64; 6];
        for a in 0..3 {
            k[a] = (s.geom.row_dir[a] * 100.0).round() as i64;
            k[a + 3] = (s.geom.col_dir[a] * 100.0).round() as i64;
        }
        (k, s.rows, s.cols)
    };
    let mut counts: BTreeMap<([i64; 6], usize, usize), usize> = BTreeMap::new();
    for s in &phase.slices {
        *counts.entry(key(s)).or_default() += 1;
    }
    let (major, _) = counts.iter().max_by_key(|(_, v)| **v)?;
    let major = *major;
    let mut slices: Vec<SliceRef> = phase
        .slices
        .iter()
        .filter(|s| key(s) == major)
        .cloned()
        .collect();
    if slices.len() < phase.slices.len() {
        notes.push(format!(
            "MR: {} slice(s) with a different orientation or size dropped from phase '{}'",
            phase.slices.len() - slices.len(),
            phase.description
        ));
    }
    let g0 = slices.first().map(|s| s.geom).unwrap_or(first.geom);
    let normal = g0.normal();
    let dist = |s: &SliceRef| dot(s.geom.position, normal);
    slices.sort_by(|a, b| {
        dist(a)
            .total_cmp(&dist(b))
            .then(a.instance_number.cmp(&b.instance_number))
    });
    let before = slices.len();
    slices.dedup_by(|b, a| (dist(a) - dist(b)).abs() < 1e-3);
    if slices.len() < before {
        notes.push(format!(
            "MR: {} duplicate slice position(s) dropped",
            before - slices.len()
        ));
    }
    let mut gaps: Vec<f64> = slices
        .windows(2)
        .map(|w| dist(&w[1]) - dist(&w[0]))
        .collect();
    gaps.sort_by(f64::total_cmp);
    let dz = gaps
        .get(gaps.len() / 2)
        .copied()
        .filter(|v| *v > 1e-6)
        .unwrap_or(1.0);
    if let (Some(lo), Some(hi)) = (gaps.first(), gaps.last())
        && hi - lo > 0.1 * dz
    {
        notes.push(format!(
            "MR: uneven slice spacing ({lo:.2}..{hi:.2} mm); median {dz:.2} mm used"
        ));
    }
    let s0 = slices.first()?.geom;
    Some(Stack {
        rows: major.1,
        cols: major.2,
        origin: s0.position,
        row_dir: s0.row_dir,
        col_dir: s0.col_dir,
        normal,
        spacing: [dz, s0.spacing[0], s0.spacing[1]],
        slices,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, PrimitiveValue, VR};

    fn with_view(code: Option<(&str, &str)>, position: &str) -> Obj {
        let mut o = Obj::new_empty();
        if let Some((value, meaning)) = code {
            let item = Obj::from_element_iter([
                DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from(value)),
                DataElement::new(tags::CODE_MEANING, VR::LO, PrimitiveValue::from(meaning)),
            ]);
            o.put(DataElement::new(
                tags::VIEW_CODE_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(vec![item]),
            ));
        }
        if !position.is_empty() {
            o.put_str(tags::VIEW_POSITION, VR::CS, position);
        }
        o
    }

    #[test]
    fn laterality_from_the_image_else_the_series_else_the_frame() {
        let seq = |tag, item: Obj| DataElement::new(tag, VR::SQ, DataSetSequence::from(vec![item]));
        let mut enhanced = Obj::new_empty();
        let anatomy = Obj::from_element_iter([DataElement::new(
            tags::FRAME_LATERALITY,
            VR::CS,
            PrimitiveValue::from("R"),
        )]);
        let frame = Obj::from_element_iter([seq(tags::FRAME_ANATOMY_SEQUENCE, anatomy)]);
        enhanced.put(seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, frame));
        assert_eq!(laterality_term(&enhanced).as_deref(), Some("R"));
        enhanced.put_str(tags::LATERALITY, VR::CS, "l");
        assert_eq!(laterality_term(&enhanced).as_deref(), Some("L"));
        enhanced.put_str(tags::IMAGE_LATERALITY, VR::CS, "B");
        assert_eq!(laterality_term(&enhanced).as_deref(), Some("B"));
        assert_eq!(laterality_term(&Obj::new_empty()), None);
    }

    #[test]
    fn the_view_code_wins_over_view_position() {
        let term = |code, position| view_term(&with_view(code, position));
        let owned = |t: &str, c| Some((t.to_string(), c));
        assert_eq!(term(Some(("399162004", "")), "MLO"), owned("CC", true));
        assert_eq!(term(Some(("R-10226", "")), ""), owned("MLO", true));
        assert_eq!(term(Some(("X", "cranio-caudal")), ""), owned("CC", true));
        assert_eq!(
            term(Some(("399368009", "cranio-caudal")), ""),
            owned("MLO", true)
        );
        assert_eq!(term(Some(("399260004", "")), "CC"), owned("ML", true));
        // An unknown code leaves View Position to say it.
        assert_eq!(term(Some(("X", "other")), "mlo "), owned("MLO", false));
        assert_eq!(term(None, ""), None);
        assert_eq!(
            mg_view(&with_view(Some(("R-10224", "")), "")),
            (None, false)
        );
    }
}
