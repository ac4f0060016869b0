//! `cargo run --example dump_inputs -- OUT_DIR FILES...`: prepares a case and
//! writes the model inputs as 8-bit PGM images (MG channels, US, MRI central
//! slices) for visual inspection.
use std::io::Write;
use std::path::PathBuf;

use her2map::imaging::{ImagingSettings, InputGrid, prepare_case};

fn pgm(path: PathBuf, w: usize, h: usize, data: &[f32], lo: f32, hi: f32) {
    let mut f = std::fs::File::create(&path).expect("create");
    write!(f, "P5\n{w} {h}\n255\n").expect("write");
    let bytes: Vec<u8> = data
        .iter()
        .map(|v| (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    f.write_all(&bytes).expect("write");
}

fn main() {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().expect("usage: dump_inputs OUT_DIR FILES..."));
    let mut files: Vec<PathBuf> = Vec::new();
    for a in args {
        let p = PathBuf::from(a);
        if p.is_dir() {
            for e in std::fs::read_dir(&p).expect("read_dir").flatten() {
                if e.path().is_dir() {
                    files.extend(
                        std::fs::read_dir(e.path())
                            .expect("read_dir")
                            .flatten()
                            .map(|e| e.path()),
                    );
                } else {
                    files.push(e.path());
                }
            }
        } else {
            files.push(p);
        }
    }
    std::fs::create_dir_all(&out).expect("mkdir");
    let case = prepare_case(&files, &ImagingSettings::default(), InputGrid::default());
    for n in &case.notes {
        println!("note: {n}");
    }
    for e in &case.errors {
        println!(
            "error: {} {:?}: {}",
            e.file.display(),
            e.sop_instance_uid,
            e.message
        );
    }
    for s in &case.selections {
        println!(
            "{:?} {} via {}: {:?}",
            s.modality, s.role, s.roi_provider, s.geometry
        );
    }
    if let Some(mg) = &case.mg {
        let n = mg.size;
        for (c, name) in ["cc", "mlo", "cc_crop", "mlo_crop"].iter().enumerate() {
            pgm(
                out.join(format!("mg_{name}.pgm")),
                n,
                n,
                &mg.data[c * n * n..(c + 1) * n * n],
                0.0,
                1.0,
            );
        }
    }
    if let Some(us) = &case.us {
        pgm(out.join("us.pgm"), us.size, us.size, &us.data, 0.0, 1.0);
    }
    if let Some(m) = &case.mri {
        let [nz, ny, nx] = m.shape;
        let z = nz / 2;
        pgm(
            out.join("mri_axial.pgm"),
            nx,
            ny,
            &m.data[z * ny * nx..(z + 1) * ny * nx],
            -1.0,
            1.0,
        );
        let y = ny / 2;
        let cor: Vec<f32> = (0..nz)
            .flat_map(|z| (0..nx).map(move |x| (z, x)))
            .map(|(z, x)| m.data[(z * ny + y) * nx + x])
            .collect();
        pgm(out.join("mri_coronal.pgm"), nx, nz, &cor, -1.0, 1.0);
    }
}
