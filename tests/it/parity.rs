//! Parity of the Candle port with the authors' PyTorch `Model3`, using the
//! reduced-size fixtures in test-data/parity (see its README.md): outputs of
//! all six availability cases, every stage and block intermediate on real and
//! all-zero inputs, CAMs, loading from both the .pth and the .safetensors.
//!
//! The model runs on `HER2MAP_TEST_DEVICE` (default `cpu`; `cuda:0` in
//! scripts/gpu-check.sh, with a `--features cuda` build), against the same
//! fixtures and tolerances: every op's GPU path is held to the CPU's bounds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use her2map::inference::{infer_tensors_file, parse_flags};
use her2map::modality::Modality;
use her2map::model::{MapConfig, MapInputs, MapModel, MapOutput, ModelError};

const CASES: [&str; 6] = ["all", "no_mri", "no_us", "mg_only", "no_mg", "mixed"];
/// Outputs: logits, probabilities, embeddings, CAMs.
const ATOL_OUT: f32 = 1e-4;
/// Intermediates: 1e-3, or 1e-4 of the tensor's max magnitude if larger.
const ATOL_MID: f32 = 1e-3;
const RTOL_MID: f32 = 1e-4;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("test-data/parity")
}

fn weights(ext: &str) -> PathBuf {
    data_dir().join(format!("map_small_weights.{ext}"))
}

fn io() -> &'static HashMap<String, Tensor> {
    static IO: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    IO.get_or_init(|| {
        candle_core::safetensors::load(data_dir().join("map_small_io.safetensors"), &Device::Cpu)
            .expect("fixture io file")
    })
}

fn fx(name: &str) -> &'static Tensor {
    io().get(name)
        .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
}

/// The device under test (`HER2MAP_TEST_DEVICE`, default the CPU).
fn dev() -> &'static Device {
    static DEV: OnceLock<Device> = OnceLock::new();
    DEV.get_or_init(|| {
        let spec = std::env::var("HER2MAP_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
        // TF32 matmuls (GPU only; off unless asked): to measure what they move.
        her2map::inference::set_tf32(std::env::var_os("HER2MAP_TEST_TF32").is_some());
        her2map::inference::parse_device(&spec).expect("HER2MAP_TEST_DEVICE")
    })
}

/// Fixture inputs (on the CPU) on the device under test.
fn on_dev(i: MapInputs) -> MapInputs {
    let mv = |t: Tensor| t.to_device(dev()).unwrap();
    MapInputs {
        mri: i.mri.map(mv),
        us: i.us.map(mv),
        mg: i.mg.map(mv),
        clinical: mv(i.clinical),
        flags: i.flags,
    }
}

fn model(ext: &'static str) -> &'static MapModel {
    static PTH: OnceLock<MapModel> = OnceLock::new();
    static ST: OnceLock<MapModel> = OnceLock::new();
    let cell = if ext == "pth" { &PTH } else { &ST };
    cell.get_or_init(|| MapModel::load(&weights(ext), dev()).expect("load weights"))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor, what: &str) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    max_abs(&(cpu(a) - cpu(b)).unwrap())
}

fn flags_of(case: &str) -> Vec<[bool; 3]> {
    fx(&format!("case.{case}.flags"))
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| [r[0] > 0.5, r[1] > 0.5, r[2] > 0.5])
        .collect()
}

/// The reference's inputs for a case: missing modality = zeros (per sample);
/// a branch absent from every sample is passed as `None` (skipped).
fn case_inputs(case: &str) -> MapInputs {
    let flags = flags_of(case);
    let pick = |branch: Modality| -> Option<Tensor> {
        let k = branch.branch();
        if !flags.iter().any(|f| f[k]) {
            return None;
        }
        let x = fx(&format!("input.{}", branch.key()));
        let mask: Vec<f32> = flags.iter().map(|f| if f[k] { 1.0 } else { 0.0 }).collect();
        let mut shape = vec![1usize; x.rank()];
        shape[0] = mask.len();
        let m = Tensor::from_vec(mask, shape, &Device::Cpu).unwrap();
        Some(x.broadcast_mul(&m).unwrap())
    };
    on_dev(MapInputs {
        mri: pick(Modality::MR),
        us: pick(Modality::US),
        mg: pick(Modality::MG),
        clinical: fx("input.clinical").clone(),
        flags,
    })
}

fn check_outputs(case: &str, out: &MapOutput, worst: &mut HashMap<&'static str, f32>) {
    let mut upd = |cat: &'static str, d: f32, what: String| {
        assert!(d <= ATOL_OUT, "{what}: max abs diff {d:e} > {ATOL_OUT:e}");
        let w = worst.entry(cat).or_insert(0.0);
        *w = w.max(d);
    };
    let p = format!("case.{case}");
    upd(
        "logits",
        max_diff(&out.logits, fx(&format!("{p}.logits")), &p),
        format!("{p}.logits"),
    );
    let ref_p1 = fx(&format!("{p}.probs"))
        .narrow(1, 1, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    upd(
        "probs",
        max_diff(&out.probs, &ref_p1, &p),
        format!("{p}.probs"),
    );
    upd(
        "fused",
        max_diff(&out.fused, fx(&format!("{p}.fused")), &p),
        format!("{p}.fused"),
    );
    let flags = flags_of(case);
    for b in Modality::MODEL_ORDER {
        let k = b.branch();
        let ran = flags.iter().any(|f| f[k]);
        assert_eq!(
            out.embeddings[k].is_some(),
            ran,
            "{p}: branch {} run",
            b.key()
        );
        if let Some(e) = &out.embeddings[k] {
            let name = format!("{p}.emb_{}", b.key());
            upd("embeddings", max_diff(e, fx(&name), &name), name);
            let name = format!("{p}.logits_{}", b.key());
            let l = out.branch_logits[k].as_ref().unwrap();
            upd("branch_logits", max_diff(l, fx(&name), &name), name);
        }
    }
}

#[test]
fn cases_match_reference_from_both_formats() {
    for ext in ["safetensors", "pth"] {
        let m = model(ext);
        let mut worst = HashMap::new();
        for case in CASES {
            let out = m.forward(&case_inputs(case)).unwrap();
            check_outputs(case, &out, &mut worst);
        }
        let mut w: Vec<_> = worst.into_iter().collect();
        w.sort_by(|a, b| a.0.cmp(b.0));
        println!("[{ext}] worst output diffs: {w:?}");
    }
}

#[test]
fn cams_match_reference_from_both_formats() {
    for ext in ["safetensors", "pth"] {
        let out = model(ext).forward(&case_inputs("all")).unwrap();
        for b in Modality::MODEL_ORDER {
            let k = b.branch();
            for (got, name) in [
                (&out.cams_grid[k], format!("cam_{}", b.key())),
                (&out.cams_raw[k], format!("cam_{}_raw", b.key())),
            ] {
                let d = max_diff(got.as_ref().unwrap(), fx(&name), &name);
                println!("[{ext}] {name}: max abs diff {d:e}");
                assert!(d <= ATOL_OUT, "{name}: {d:e}");
            }
            // The upsampled CAM keeps the input grid and is non-negative.
            let up = out.cams[k].as_ref().unwrap();
            let side = match b {
                Modality::US => m_side(ext, |c| c.us.img_size),
                Modality::MR => m_side(ext, |c| c.mri.img_size),
                Modality::MG => m_side(ext, |c| c.mg.img_size),
            };
            assert!(up.dims()[1..].iter().all(|&s| s == side), "{:?}", up.dims());
            assert!(
                up.flatten_all()
                    .unwrap()
                    .min(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    >= 0.0
            );
        }
    }
}

fn m_side(ext: &'static str, f: impl Fn(&MapConfig) -> usize) -> usize {
    f(model(ext).config())
}

/// Compare every `<branch>.<variant>.*` fixture intermediate with the trace.
fn check_intermediates(ext: &'static str, variant: &str, inputs: &MapInputs) {
    let (_, trace) = model(ext).forward_traced(inputs).unwrap();
    let mut n = 0;
    let mut worst: HashMap<String, (f32, String)> = HashMap::new();
    let mut names: Vec<&String> = io().keys().collect();
    names.sort();
    for name in names {
        let Some((branch, rest)) = name.split_once('.') else {
            continue;
        };
        if !["mri", "us", "mg"].contains(&branch) {
            continue;
        }
        let Some(stage) = rest.strip_prefix(&format!("{variant}.")) else {
            continue;
        };
        let key = format!("{branch}.{stage}");
        let got = trace
            .get(&key)
            .unwrap_or_else(|| panic!("[{ext}] no traced tensor for fixture {name}"));
        let reference = fx(name);
        let d = max_diff(got, reference, name);
        let tol = ATOL_MID.max(RTOL_MID * max_abs(reference));
        assert!(d <= tol, "[{ext}] {name}: max abs diff {d:e} > {tol:e}");
        // Category = name with indices folded, e.g. mri.layers.*.blocks.*
        let cat: String = stage
            .split('.')
            .map(|p| if p.parse::<usize>().is_ok() { "*" } else { p })
            .collect::<Vec<_>>()
            .join(".");
        let e = worst
            .entry(format!("{branch}.{variant}.{cat}"))
            .or_insert((0.0, String::new()));
        if d >= e.0 {
            *e = (d, name.clone());
        }
        n += 1;
    }
    assert!(n > 0, "no {variant} intermediates compared");
    let mut w: Vec<_> = worst.into_iter().collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    println!("[{ext}] {variant}: {n} intermediates compared; worst per category:");
    for (cat, (d, name)) in w {
        println!("  {cat:45} {d:.3e}  ({name})");
    }
}

#[test]
fn intermediates_match_reference_on_real_inputs() {
    for ext in ["safetensors", "pth"] {
        check_intermediates(ext, "real", &case_inputs("all"));
    }
}

#[test]
fn intermediates_match_reference_on_zero_inputs() {
    let zeros = |name: &str| fx(name).zeros_like().unwrap();
    let inputs = on_dev(MapInputs {
        mri: Some(zeros("input.mri")),
        us: Some(zeros("input.us")),
        mg: Some(zeros("input.mg")),
        clinical: fx("input.clinical").clone(),
        flags: vec![[true; 3]; 2],
    });
    for ext in ["safetensors", "pth"] {
        check_intermediates(ext, "zero", &inputs);
    }
}

#[test]
fn config_derived_from_checkpoint_matches_fixture_config() {
    let text = std::fs::read_to_string(data_dir().join("map_small_config.json")).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let list =
        |v: &serde_json::Value| -> Vec<usize> { v.as_array().unwrap().iter().map(u).collect() };
    for ext in ["safetensors", "pth"] {
        let cfg = model(ext).config();
        let m = &j["mri"]["ctor_kwargs_effective"];
        assert_eq!(cfg.mri.img_size, u(&m["img_size"]));
        assert_eq!(cfg.mri.patch_size, u(&m["patch_size"]));
        assert_eq!(cfg.mri.in_chans, u(&m["in_chans"]));
        assert_eq!(cfg.mri.embed_dim, u(&m["embed_dim"]));
        assert_eq!(cfg.mri.depths, list(&m["depths"]));
        assert_eq!(cfg.mri.num_heads, list(&m["num_heads"]));
        assert_eq!(cfg.mri.window_size, u(&m["window_size"]));
        assert_eq!(cfg.mri.mlp_ratio as f64, m["mlp_ratio"].as_f64().unwrap());
        for (h, key) in [(&cfg.us, "us"), (&cfg.mg, "mg")] {
            let c = &j[key]["ctor_kwargs_effective"];
            assert_eq!(h.img_size, u(&c["img_size"]), "{key}");
            assert_eq!(h.in_chans, u(&c["in_chans"]), "{key}");
            assert_eq!(h.patch_sizes, list(&c["patch_size"]), "{key}");
            assert_eq!(h.dims, list(&c["dim"]), "{key}");
            assert_eq!(h.depths, list(&c["depth"]), "{key}");
            assert_eq!(h.num_heads, list(&c["num_heads"]), "{key}");
            assert_eq!(h.num_inner_heads, list(&c["num_inner_head"]), "{key}");
            assert_eq!(
                h.mlp_ratio as f64,
                c["mlp_ratio"].as_f64().unwrap(),
                "{key}"
            );
        }
        assert_eq!(cfg.fusion_dim, u(&j["fusion_feature_dim_F"]));
        assert_eq!(cfg.clinical_dim, 5);
        assert_eq!(cfg.num_classes, 2);
        assert_eq!(cfg.mri_input_side(), 48);
        assert_eq!(cfg.us_input_side(), 128);
        assert_eq!(cfg.mg_input_side(), 128);
    }
    // Both formats derive the same configuration, and the reference preset
    // passes its own validation and round-trips through JSON.
    assert_eq!(model("pth").config(), model("safetensors").config());
    let r = MapConfig::reference();
    r.validate().unwrap();
    assert_eq!(
        MapConfig::from_json(&serde_json::to_string(&r).unwrap()).unwrap(),
        r
    );
}

/// Write the fixture weights with one tensor replaced (or removed) to a temp
/// safetensors file and try to load it.
fn load_modified(key: &str, replacement: Option<Tensor>) -> Result<MapModel, ModelError> {
    let mut ts = candle_core::safetensors::load(weights("safetensors"), &Device::Cpu).unwrap();
    assert!(ts.remove(key).is_some(), "fixture has {key}");
    if let Some(t) = replacement {
        ts.insert(key.to_string(), t);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("modified.safetensors");
    candle_core::safetensors::save(&ts, &path).unwrap();
    MapModel::load(&path, &Device::Cpu)
}

#[test]
fn wrong_shape_error_names_key_and_shapes() {
    let key = "backbone_mri.layers.1.blocks.0.mlp.fc1.weight";
    let bad = Tensor::zeros((96, 25), DType::F32, &Device::Cpu).unwrap();
    let err = load_modified(key, Some(bad)).unwrap_err();
    match &err {
        ModelError::ShapeMismatch {
            key: k,
            expected,
            found,
        } => {
            assert_eq!(k, key);
            assert_eq!(expected, &vec![96, 24]);
            assert_eq!(found, &vec![96, 25]);
        }
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(key) && msg.contains("[96, 25]") && msg.contains("[96, 24]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_error_names_key() {
    let key = "backbone_us.stage.2.blocks.0.attn_in1.v.weight";
    let err = load_modified(key, None).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor { key: k } if k == key),
        "{err:?}"
    );
    assert!(err.to_string().contains(key));
    // A key used to derive the configuration is reported the same way.
    let key = "head.weight";
    let err = load_modified(key, None).unwrap_err();
    assert!(err.to_string().contains(key), "{err}");
}

#[test]
fn inconsistent_checkpoint_is_a_config_error() {
    // A head whose width disagrees with the fusion width.
    let bad = Tensor::zeros((2, 50), DType::F32, &Device::Cpu).unwrap();
    let err = load_modified("head.weight", Some(bad)).unwrap_err();
    assert!(err.to_string().contains("head.weight"), "{err}");
}

#[test]
fn unknown_extension_is_rejected() {
    let err = MapModel::load(Path::new("weights.onnx"), &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedFormat(_)), "{err:?}");
}

#[test]
fn sample_without_modality_is_an_error() {
    let mut inputs = case_inputs("all");
    inputs.flags[1] = [false, false, false];
    let err = model("safetensors").forward(&inputs).unwrap_err();
    assert!(
        matches!(err, ModelError::NoModality { sample: 1 }),
        "{err:?}"
    );
    // A set flag without its tensor is an input error, not a panic.
    let mut inputs = case_inputs("all");
    inputs.us = None;
    let err = model("safetensors").forward(&inputs).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err:?}");
}

#[test]
fn skipping_a_branch_equals_running_it_on_zeros_with_flag_0() {
    let m = model("safetensors");
    // no_mri skips the MRI branch entirely.
    let skipped = m.forward(&case_inputs("no_mri")).unwrap();
    assert!(skipped.embeddings[Modality::MR.branch()].is_none());
    // Same samples, but sample 1 has MRI present, so the branch runs and
    // sample 0 goes through it on zeros with flag 0.
    let mut run = case_inputs("all");
    let mri = fx("input.mri");
    let zero0 = Tensor::cat(
        &[
            &mri.narrow(0, 0, 1).unwrap().zeros_like().unwrap(),
            &mri.narrow(0, 1, 1).unwrap(),
        ],
        0,
    )
    .unwrap();
    run.mri = Some(zero0.to_device(dev()).unwrap());
    run.flags = vec![[true, false, true], [true, true, true]];
    let ran = m.forward(&run).unwrap();
    assert!(ran.embeddings[Modality::MR.branch()].is_some());
    let a = skipped.logits.narrow(0, 0, 1).unwrap();
    let b = ran.logits.narrow(0, 0, 1).unwrap();
    let d = max_diff(&a, &b, "logits sample 0");
    assert!(d <= 1e-6, "{d:e}");
    let d = max_diff(
        &skipped.fused.narrow(0, 0, 1).unwrap(),
        &ran.fused.narrow(0, 0, 1).unwrap(),
        "fused",
    );
    assert!(d <= 1e-6, "{d:e}");
}

#[test]
fn sha256_matches_sha256sum() {
    for ext in ["safetensors", "pth"] {
        let path = weights(ext);
        let out = std::process::Command::new("sha256sum")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        let expected = String::from_utf8(out.stdout).unwrap();
        let expected = expected.split_whitespace().next().unwrap();
        assert_eq!(model(ext).weights_sha256(), expected, "{ext}");
    }
}

#[test]
fn infer_tensors_file_gives_reference_probs() {
    let inputs = data_dir().join("map_small_io.safetensors");
    for (case, flags) in [
        ("all", "1,1,1"),
        ("mixed", "1,1,1;0,1,0"),
        ("no_mri", "1,0,1"),
    ] {
        let v = infer_tensors_file(&weights("safetensors"), &inputs, flags, "cpu").unwrap();
        let reference = fx(&format!("case.{case}.probs")).to_vec2::<f32>().unwrap();
        let samples = v["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        for (s, r) in samples.iter().zip(&reference) {
            let p = s["prob"].as_f64().unwrap() as f32;
            assert!((p - r[1]).abs() <= ATOL_OUT, "{case}: {p} vs {}", r[1]);
        }
        let fl = parse_flags(flags, 2).unwrap();
        for (i, s) in samples.iter().enumerate() {
            for b in Modality::MODEL_ORDER {
                let v = &s["branch_probs"][b.key()];
                assert_eq!(
                    v.is_null(),
                    !fl[i][b.branch()],
                    "{case} sample {i} {}",
                    b.key()
                );
            }
        }
        assert_eq!(v["weights_sha256"].as_str().unwrap().len(), 64);
    }
    assert!(parse_flags("1,1", 2).is_err());
    assert!(parse_flags("1,1,1;1,1,1;1,1,1", 2).is_err());
    assert!(parse_flags("1,2,1", 2).is_err());
    let err = infer_tensors_file(&weights("safetensors"), &inputs, "1,1,1", "cuda:0");
    if !cfg!(feature = "cuda") {
        assert!(matches!(err, Err(ModelError::Device(_))));
    }
}

#[test]
fn data_parallel_prefix_is_accepted() {
    // Keys saved from nn.DataParallel carry a "module." prefix.
    let ts = candle_core::safetensors::load(weights("safetensors"), &Device::Cpu).unwrap();
    let ts: HashMap<String, Tensor> = ts
        .into_iter()
        .map(|(k, v)| (format!("module.{k}"), v))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefixed.safetensors");
    candle_core::safetensors::save(&ts, &path).unwrap();
    let m = MapModel::load(&path, dev()).unwrap();
    assert_eq!(m.config(), model("safetensors").config());
    let out = m.forward(&case_inputs("no_mg")).unwrap();
    let d = max_diff(&out.logits, fx("case.no_mg.logits"), "logits");
    assert!(d <= ATOL_OUT, "{d:e}");
}
