//! The inference engine: loading errors at start, async requests served by
//! the model thread with plain-data inputs, device string parsing.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use her2map::inference::{Engine, InferRequest, TensorData, parse_device};
use her2map::model::ModelError;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("test-data/parity")
}

fn plain(t: &Tensor) -> TensorData {
    TensorData::new(
        t.dims().to_vec(),
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn engine_serves_requests_and_matches_reference() {
    let io =
        candle_core::safetensors::load(data_dir().join("map_small_io.safetensors"), &Device::Cpu)
            .unwrap();
    let engine =
        Engine::start(&data_dir().join("map_small_weights.safetensors"), "cpu", 2).unwrap();
    assert_eq!(engine.config().mri_input_side(), 48);
    assert_eq!(engine.weights_sha256().len(), 64);

    // Case `no_us`: the US branch is skipped, so no US tensor is needed.
    let req = InferRequest {
        mri: Some(plain(&io["input.mri"])),
        us: None,
        mg: Some(plain(&io["input.mg"])),
        clinical: plain(&io["input.clinical"]),
        flags: vec![[false, true, true]; 2],
        want_cams: true,
    };
    // Two requests in flight at once through the same handle clones.
    let other = engine.clone();
    let (a, b) = tokio::join!(other.infer(req.clone()), engine.infer(req));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.samples, b.samples);
    let reference = io["case.no_us.probs"].to_vec2::<f32>().unwrap();
    for (s, r) in a.samples.iter().zip(&reference) {
        assert!((s.prob - r[1]).abs() < 1e-4, "{} vs {}", s.prob, r[1]);
        assert!(s.branch_probs[0].is_none() && s.branch_probs[1].is_some());
    }
    assert!(a.compute_ms > 0.0 && a.total_ms >= a.compute_ms);
    assert!(a.cams[0].is_none());
    let mri_cam = a.cams[1].as_ref().unwrap();
    assert_eq!(mri_cam.grid.shape, vec![2, 3, 3, 3]);
    assert_eq!(mri_cam.input.shape, vec![2, 48, 48, 48]);
    assert_eq!(a.cams[2].as_ref().unwrap().input.shape, vec![2, 128, 128]);

    // A bad request is an error for that request only.
    let bad = InferRequest {
        mri: None,
        us: None,
        mg: None,
        clinical: plain(&io["input.clinical"]),
        flags: vec![[false, true, false]; 2],
        want_cams: false,
    };
    assert!(matches!(engine.infer(bad).await, Err(ModelError::Input(_))));
}

#[test]
fn engine_start_fails_on_bad_weights_or_device() {
    let missing = Engine::start(Path::new("/nonexistent/weights.safetensors"), "cpu", 1);
    assert!(matches!(missing, Err(ModelError::Io { .. })));
    let weights = data_dir().join("map_small_weights.safetensors");
    assert!(matches!(
        Engine::start(&weights, "tpu", 1),
        Err(ModelError::Device(_))
    ));
    assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
    assert!(parse_device("cuda:x").is_err());
    if !cfg!(feature = "cuda") {
        let err = parse_device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("cuda"), "{err}");
        // Without CUDA in the build, "auto" is the CPU.
        assert!(matches!(parse_device("auto"), Ok(Device::Cpu)));
    }
    assert_eq!(her2map::inference::device_label(&Device::Cpu), "cpu");
    assert!(TensorData::new(vec![2, 3], vec![0.0; 5]).is_err());
}
