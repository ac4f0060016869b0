//! The inference engine: loading errors at start, async requests served by
//! the model thread with plain-data inputs, device string parsing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use her2map::inference::{
    Engine, EngineOptions, InferRequest, InferResponse, TensorData, parse_device,
};
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
    let engine = Engine::start(
        &data_dir().join("map_small_weights.safetensors"),
        "cpu",
        EngineOptions {
            queue: 2,
            max_batch: 1,
        },
    )
    .unwrap();
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
    let missing = Engine::start(
        Path::new("/nonexistent/weights.safetensors"),
        "cpu",
        EngineOptions::default(),
    );
    assert!(matches!(missing, Err(ModelError::Io { .. })));
    let weights = data_dir().join("map_small_weights.safetensors");
    assert!(matches!(
        Engine::start(&weights, "tpu", EngineOptions::default()),
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

/// One sample of the fixture inputs: sample `i`, with the branches `flags`
/// has (a branch it lacks is left out of the request, as the pipeline
/// does for a case without that modality).
fn one_sample(io: &HashMap<String, Tensor>, i: usize, flags: [bool; 3]) -> InferRequest {
    let row = |name: &str| plain(&io[name].narrow(0, i, 1).unwrap());
    InferRequest {
        us: flags[0].then(|| row("input.us")),
        mri: flags[1].then(|| row("input.mri")),
        mg: flags[2].then(|| row("input.mg")),
        clinical: row("input.clinical"),
        flags: vec![flags],
        want_cams: true,
    }
}

fn assert_same(alone: &InferResponse, batched: &InferResponse, what: &str) {
    assert_eq!(alone.samples.len(), batched.samples.len(), "{what}");
    for (a, b) in alone.samples.iter().zip(&batched.samples) {
        assert!(
            (a.prob - b.prob).abs() <= 1e-5,
            "{what}: {} vs {}",
            a.prob,
            b.prob
        );
        for (x, y) in a.logits.iter().zip(&b.logits) {
            assert!((x - y).abs() <= 1e-4, "{what}: logits {x} vs {y}");
        }
        for k in 0..3 {
            assert_eq!(
                a.branch_probs[k].is_some(),
                b.branch_probs[k].is_some(),
                "{what}"
            );
            if let (Some(x), Some(y)) = (a.branch_probs[k], b.branch_probs[k]) {
                assert!((x - y).abs() <= 1e-5, "{what}: branch {k} {x} vs {y}");
            }
        }
    }
    for k in 0..3 {
        match (&alone.cams[k], &batched.cams[k]) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                assert_eq!(a.input.shape, b.input.shape, "{what}: CAM {k}");
                let d = a
                    .raw
                    .data
                    .iter()
                    .zip(&b.raw.data)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 1e-4, "{what}: CAM {k} differs by {d:e}");
            }
            _ => panic!("{what}: CAM {k} present in one run only"),
        }
    }
}

/// Requests queued while the engine is busy run as one batch (at most
/// `max_batch` samples; one that does not fit starts the next batch), with
/// mixed modality availability, and each gets what it would have got alone.
#[tokio::test(flavor = "current_thread")]
async fn queued_requests_run_as_one_batch_with_the_results_of_each_alone() {
    let io =
        candle_core::safetensors::load(data_dir().join("map_small_io.safetensors"), &Device::Cpu)
            .unwrap();
    let weights = data_dir().join("map_small_weights.safetensors");
    let alone_engine = Engine::start(&weights, "cpu", EngineOptions::default()).unwrap();
    let engine = Engine::start(
        &weights,
        "cpu",
        EngineOptions {
            queue: 8,
            max_batch: 4,
        },
    )
    .unwrap();
    assert_eq!(engine.max_batch(), 4);
    let all = [true; 3];
    // First: a full batch of its own (both fixture samples twice over), so
    // that the engine is busy while the others queue behind it.
    let parts: Vec<InferRequest> = (0..4).map(|i| one_sample(&io, i % 2, all)).collect();
    let refs: Vec<&InferRequest> = parts.iter().collect();
    let first = her2map::inference::merge(&refs).unwrap().0;
    let reqs = vec![
        first,
        one_sample(&io, 0, [true, false, true]),  // no MRI
        one_sample(&io, 1, [false, true, false]), // MRI only
        one_sample(&io, 1, all),
        // 3 samples queued above; 2 more do not fit: the next batch.
        her2map::inference::merge(&[
            &one_sample(&io, 0, all),
            &one_sample(&io, 1, [false, false, true]),
        ])
        .unwrap()
        .0,
    ];
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(alone_engine.infer(r.clone()).await.unwrap());
    }
    assert!(alone.iter().all(|r| r.batch_requests == 1));
    let (a, b, c, d, e) = tokio::join!(
        engine.infer(reqs[0].clone()),
        engine.infer(reqs[1].clone()),
        engine.infer(reqs[2].clone()),
        engine.infer(reqs[3].clone()),
        engine.infer(reqs[4].clone()),
    );
    let batched = [a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap(), e.unwrap()];
    let shared: Vec<usize> = batched.iter().map(|r| r.batch_requests).collect();
    assert_eq!(shared, [1, 3, 3, 3, 1], "requests per forward pass");
    for (i, (x, y)) in alone.iter().zip(&batched).enumerate() {
        assert_same(x, y, &format!("request {i}"));
    }
    // A request without MRI gets no MRI CAM from the batch that ran one.
    assert!(batched[1].cams[1].is_none() && batched[2].cams[1].is_some());

    // A bad request in a batch fails alone; the others still get results.
    let bad = InferRequest {
        mri: None,
        us: None,
        mg: None,
        clinical: plain(&io["input.clinical"].narrow(0, 0, 1).unwrap()),
        flags: vec![[false, true, false]],
        want_cams: true,
    };
    let (x, y, z) = tokio::join!(
        engine.infer(reqs[0].clone()),
        engine.infer(bad),
        engine.infer(reqs[1].clone()),
    );
    assert_same(&alone[0], &x.unwrap(), "before the bad one");
    assert!(matches!(y, Err(ModelError::Input(_))), "{y:?}");
    assert_same(&alone[1], &z.unwrap(), "after the bad one");
}
