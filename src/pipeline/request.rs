//! The model's side of a case: the prepared sides batched into one
//! inference request (the tensor layout of MODEL.md "Inputs"), the digest
//! that tells whether a rerun selected the same inputs, and the request
//! written out in the fixtures' layout for replay.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::PipelineError;
use crate::imaging::{InputGrid, Modality, PreparedCase};
use crate::inference::{InferRequest, TensorData};

/// SHA-256 over the sorted SOP Instance UIDs each side's inputs came from.
pub(super) fn inputs_digest(prepared: &[PreparedCase]) -> String {
    let mut h = Sha256::new();
    for p in prepared {
        let mut uids: Vec<&str> = p
            .selections
            .iter()
            .flat_map(|s| s.sop_instance_uids.iter().map(String::as_str))
            .collect();
        uids.sort_unstable();
        for u in uids {
            h.update(u.as_bytes());
            h.update(b"\n");
        }
        h.update(b"--\n");
    }
    hex::encode(h.finalize())
}

/// One batch of the prepared sides; an absent modality of a side is zeros
/// with its flag 0 (the model skips a branch no sample has).
pub(crate) fn build_request(
    prepared: &[PreparedCase],
    grid: InputGrid,
) -> Result<InferRequest, PipelineError> {
    let b = prepared.len();
    let (d, s) = (grid.mri, grid.image);
    let any = |m: Modality| prepared.iter().any(|p| p.modalities().contains(m));
    let stack = |len: usize, get: &dyn Fn(&PreparedCase) -> Option<&Vec<f32>>| {
        let mut data = Vec::with_capacity(b * len);
        for p in prepared {
            match get(p) {
                Some(v) if v.len() == len => data.extend_from_slice(v),
                _ => data.extend(std::iter::repeat_n(0.0, len)),
            }
        }
        data
    };
    let us = any(Modality::US)
        .then(|| {
            TensorData::new(
                vec![b, 1, s, s],
                stack(s * s, &|p| p.us.as_ref().map(|x| &x.data)),
            )
        })
        .transpose()?;
    let mri = any(Modality::MR)
        .then(|| {
            TensorData::new(
                vec![b, 1, d, d, d],
                stack(d * d * d, &|p| p.mri.as_ref().map(|x| &x.data)),
            )
        })
        .transpose()?;
    let mg = any(Modality::MG)
        .then(|| {
            TensorData::new(
                vec![b, 4, s, s],
                stack(4 * s * s, &|p| p.mg.as_ref().map(|x| &x.data)),
            )
        })
        .transpose()?;
    let clinical = TensorData::new(
        vec![b, 5],
        prepared.iter().flat_map(|p| p.clinical).collect(),
    )?;
    Ok(InferRequest {
        mri,
        us,
        mg,
        clinical,
        flags: prepared
            .iter()
            .map(|p| p.modalities().model_flags())
            .collect(),
        want_cams: true,
    })
}

/// Write a request's tensors in the fixtures' safetensors layout; an absent
/// branch is left out (replay it with its flag 0).
pub(super) fn dump_inputs(request: &InferRequest, path: &Path) -> Result<(), PipelineError> {
    let entries = [
        ("input.mri", request.mri.as_ref()),
        ("input.us", request.us.as_ref()),
        ("input.mg", request.mg.as_ref()),
        ("input.clinical", Some(&request.clinical)),
    ];
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = entries
        .into_iter()
        .filter_map(|(k, t)| t.map(|t| (k, t)))
        .map(|(k, t)| {
            (
                k.to_string(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, data, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| PipelineError::Other(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| PipelineError::Other(e.to_string()))
}
