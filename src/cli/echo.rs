//! `her2map echo`: C-ECHO (PS3.7 9.1.5) a peer and print its status.

use std::process::ExitCode;

use her2map::dimse::client::echo;

use super::tls::ScuArgs;

#[derive(clap::Args)]
pub struct EchoArgs {
    address: String,
    #[command(flatten)]
    scu: ScuArgs,
}

pub async fn run(args: EchoArgs) -> anyhow::Result<ExitCode> {
    let address = args.address;
    let options = args.scu.options(&address)?;
    let status = echo(&address, &options).await?;
    println!("C-ECHO {address}: status {:#06X}", status.code);
    Ok(if status.code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
