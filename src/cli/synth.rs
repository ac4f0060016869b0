//! `her2map synth`: write the synthetic patient and print what was written.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output folder (one sub-folder per study).
    dir: PathBuf,
    /// Clinical sizes (about 600 MB) instead of the small default (~2 MB).
    #[arg(long)]
    full_size: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Patient's Name (PN) written into every instance.
    #[arg(long)]
    patient_name: Option<String>,
    /// Patient ID written into every instance.
    #[arg(long)]
    patient_id: Option<String>,
}

pub async fn run(args: SynthArgs) -> anyhow::Result<ExitCode> {
    let mut opts = her2map::synth::SynthOptions {
        full_size: args.full_size,
        seed: args.seed,
        ..Default::default()
    };
    if let Some(n) = args.patient_name {
        opts.patient_name = n;
    }
    if let Some(id) = args.patient_id {
        opts.patient_id = id;
    }
    let dir = args.dir;
    let dir2 = dir.clone();
    let summary =
        tokio::task::spawn_blocking(move || her2map::synth::write_synthetic_patient(&dir2, &opts))
            .await??;
    for st in &summary.studies {
        println!("{}: {} files, {} bytes", st.name, st.files.len(), st.bytes);
    }
    println!(
        "wrote {} bytes under {} (lesion side {:?})",
        summary.total_bytes,
        dir.display(),
        summary.lesion_side
    );
    Ok(ExitCode::SUCCESS)
}
