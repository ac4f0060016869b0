//! `her2map token NAME --role ROLE`: a new console/API bearer token for a
//! user, printed once with the `[[http.users]]` table (which holds only the
//! token's SHA-256) to paste into the configuration.

use std::process::ExitCode;

use her2map::config::HttpRole;

#[derive(clap::Args)]
pub struct TokenArgs {
    /// The user's name, as the audit log will record their actions.
    name: String,
    /// "viewer" (reads), "operator" (also runs, holds, releases, retries,
    /// and may STOW-RS) or "stow" (may only STOW-RS instances).
    #[arg(long, value_parser = parse_role, default_value = "viewer")]
    role: HttpRole,
}

fn parse_role(s: &str) -> Result<HttpRole, String> {
    match s {
        "viewer" => Ok(HttpRole::Viewer),
        "operator" => Ok(HttpRole::Operator),
        "stow" => Ok(HttpRole::Stow),
        other => Err(format!(
            "role must be viewer, operator or stow, not {other:?}"
        )),
    }
}

pub fn run(args: TokenArgs) -> anyhow::Result<ExitCode> {
    if args.name.trim().is_empty() || args.name.contains(['"', '\\', '\n']) {
        anyhow::bail!("the user name must be non-empty, without quotes or backslashes");
    }
    let (token, digest) = her2map::http::auth::new_token();
    println!(
        "# The token for {} (shown once; give it to the user):",
        args.name
    );
    println!("# {token}");
    println!("# Paste this into the node's configuration:");
    println!("[[http.users]]");
    println!("name = \"{}\"", args.name);
    println!("role = \"{}\"", args.role.as_str());
    println!("token_sha256 = \"{digest}\"");
    Ok(ExitCode::SUCCESS)
}
