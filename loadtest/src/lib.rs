//! wsgate's load generator. Every run is bounded in connections and time, and targets loopback.
//!
//! | module | what |
//! |---|---|
//! | `cli` | arguments, shared by all scenarios |
//! | `driver` | the two phases (ramp, run), in one process or over `--procs K` workers |
//! | `ramp` | opening a worker's share of the connections |
//! | `client` | one simulated client (fastwebsockets) |
//! | `connect`, `echo`, `fanout`, `churn` | the scenarios |
//! | `hist`, `report`, `progress` | histograms that merge across processes, measurements, the bar |

mod churn;
pub mod cli;
pub mod client;
mod connect;
mod deflate;
mod driver;
mod echo;
mod fanout;
pub mod hist;
pub mod progress;
mod ramp;
pub mod report;

use std::process::ExitCode;

use cli::{Cli, ScenarioArgs};

/// Runs the scenario the command line asks for.
pub fn main_with(cli: Cli) -> ExitCode {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("loadtest: cannot raise the open-files limit: {e}");
    }
    let common = match &cli.scenario {
        ScenarioArgs::Connect(args) => &args.common,
        ScenarioArgs::Echo(args) => &args.common,
        ScenarioArgs::Fanout(args) => &args.common,
        ScenarioArgs::Churn(args) => &args.common,
    };
    if let Err(e) = client::init_tls(common.tls_ca.as_deref()) {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.scenario {
        ScenarioArgs::Connect(args) => runtime.block_on(driver::execute(connect::Connect(args))),
        ScenarioArgs::Echo(args) => runtime.block_on(driver::execute(echo::Echo(args))),
        ScenarioArgs::Fanout(args) => runtime.block_on(driver::execute(fanout::Fanout(args))),
        ScenarioArgs::Churn(args) => runtime.block_on(driver::execute(churn::Churn(args))),
    }
}
