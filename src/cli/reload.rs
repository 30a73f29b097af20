//! `wxgate reload`: one `POST /-/reload` to the admin port of the wxgate serving the same
//! configuration file. The file was read and checked first (see [`super::Cli::run`]): a file
//! with problems is never sent.

use std::net::SocketAddr;
use std::process::ExitCode;

use http::{Method, StatusCode};

use super::admin::{reachable, request};

/// Asks the wxgate whose admin port is `admin` to reload: exit 0 and what it says when it
/// applied the file, 1 with its problems when it refused it or with why it could not be
/// asked.
pub fn reload(admin: SocketAddr) -> ExitCode {
    let target = reachable(admin);
    super::block_on(async move {
        match request(target, Method::POST, "/-/reload").await {
            Ok((StatusCode::OK, body)) => {
                print!("{body}");
                ExitCode::SUCCESS
            }
            Ok((_, body)) => {
                eprint!("wxgate reload: {body}");
                ExitCode::FAILURE
            }
            Err(error) => {
                eprintln!("wxgate reload: cannot reach the admin port {target}: {error}");
                ExitCode::FAILURE
            }
        }
    })
}
