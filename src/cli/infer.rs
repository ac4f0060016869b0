//! `her2map infer`: the model on a tensors file or on a folder of one
//! patient's DICOM files, printed as JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use her2map::config::Settings;

#[derive(clap::Args)]
pub struct InferArgs {
    /// The checkpoint (.pth or .safetensors); default: `[model] weights`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Inputs in the fixtures' safetensors layout (input.mri, input.us,
    /// input.mg, input.clinical; batch first).
    #[arg(long, conflicts_with = "dir")]
    inputs: Option<PathBuf>,
    /// `US,MRI,MG` flags for every sample (`1,1,1`) or per sample (`1,1,1;0,1,0`).
    #[arg(long, default_value = "1,1,1")]
    flags: String,
    /// A folder of one patient's DICOM files (any layout).
    dir: Option<PathBuf>,
    /// With a DICOM folder: write the exact input tensors here.
    #[arg(long)]
    dump_inputs: Option<PathBuf>,
    /// Device: cpu or cuda:N; default: `[model] device`.
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: InferArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let InferArgs {
        model,
        inputs,
        flags,
        dir,
        dump_inputs,
        device,
        json,
    } = args;
    let weights = match model {
        Some(m) => m,
        None => settings.model.weights_path()?,
    };
    let device = device.unwrap_or_else(|| settings.model.device.clone());
    let imaging = settings.imaging.clone();
    // Decoding and the model are blocking work: off the runtime's threads.
    let value = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        match (inputs, dir) {
            (Some(inputs), None) => Ok(her2map::inference::infer_tensors_file(
                &weights, &inputs, &flags, &device,
            )?),
            (None, Some(dir)) => Ok(her2map::pipeline::infer_dicom_folder(
                &weights,
                &device,
                &dir,
                &imaging,
                dump_inputs.as_deref(),
            )?),
            _ => anyhow::bail!("give either --inputs FILE or a DICOM folder"),
        }
    })
    .await??;
    if json {
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(ExitCode::SUCCESS)
}
