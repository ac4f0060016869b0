//! `her2map echo`: C-ECHO (PS3.7 9.1.5) a peer and print its status.

use std::process::ExitCode;

use her2map::dimse::client::{ClientOptions, echo};

use super::tls::TlsArgs;

#[derive(clap::Args)]
pub struct EchoArgs {
    address: String,
    #[arg(long, default_value = "HER2MAP-SCU")]
    calling_ae: String,
    #[arg(long, default_value = "ANY-SCP")]
    called_ae: String,
    #[command(flatten)]
    tls: TlsArgs,
}

pub async fn run(args: EchoArgs) -> anyhow::Result<ExitCode> {
    let address = args.address;
    let options = ClientOptions {
        calling_ae: args.calling_ae,
        called_ae: args.called_ae,
        tls: args.tls.client_tls(&address)?,
        ..Default::default()
    };
    let status = echo(&address, &options).await?;
    println!("C-ECHO {address}: status {:#06X}", status.code);
    Ok(if status.code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
