//! Runs a scenario in two phases — open the connections (ramp), then the measured run — either
//! in this process, or spread over `--procs K` worker processes of this same binary.
//!
//! Worker protocol: the coordinator starts `loadtest <same args> --worker I/K`. A worker opens
//! its share of the connections, printing JSON lines on stdout (`progress` every tick, then
//! `ready`); once every worker is ready the coordinator writes `go` to each one's stdin; each
//! runs and prints `done` with its partial result (histograms as buckets, counts), keeping its
//! connections open until the coordinator — having measured the gateways with every connection
//! still up — closes its stdin. Partial results merge exactly.

use std::future::Future;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::cli::{Common, Worker};
use crate::progress::{Bar, Progress, Snapshot, TICK};
use crate::report::{Measured, Meter};

/// A scenario: what each worker does, how partial results merge, what the report says.
pub(crate) trait Scenario {
    /// What the ramp opened, held until the end of the run.
    type Prepared;
    /// One worker's results; merging all of them must give exact totals.
    type Partial: Serialize + DeserializeOwned + Default;
    type Report: Serialize + std::fmt::Display;

    fn common(&self) -> &Common;
    /// Connections the progress bar counts up to.
    fn connections(&self) -> usize;
    /// Phase 1: open this worker's share of the connections.
    fn prepare(
        &self,
        worker: Worker,
        progress: Arc<Progress>,
    ) -> impl Future<Output = Self::Prepared>;
    /// Phase 2, started by all workers together.
    fn run(
        &self,
        prepared: &mut Self::Prepared,
        worker: Worker,
        progress: Arc<Progress>,
    ) -> impl Future<Output = Self::Partial>;
    fn merge(total: &mut Self::Partial, part: Self::Partial);
    fn report(&self, total: Self::Partial, measured: Measured) -> Outcome<Self::Report>;
}

/// The final report, and what counts against `--max-errors` and `--max-loss`.
pub(crate) struct Outcome<R> {
    pub report: R,
    pub errors: u64,
    pub losses: u64,
}

/// Runs the scenario as asked: alone, as a worker, or as the coordinator of workers.
pub(crate) async fn execute<S: Scenario>(scenario: S) -> ExitCode {
    let common = scenario.common();
    if let Err(e) = common.check() {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
    if let Some(worker) = common.worker {
        return serve_as_worker(&scenario, worker).await;
    }
    let result = if common.procs > 1 {
        coordinate(&scenario).await
    } else {
        Ok(run_alone(&scenario).await)
    };
    match result {
        Ok((total, measured)) => finish(common, scenario.report(total, measured)),
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Redraws the bar from `progress` until dropped.
fn draw(bar: &Arc<std::sync::Mutex<Bar>>, progress: &Arc<Progress>) -> tokio::task::JoinHandle<()> {
    let (bar, progress) = (bar.clone(), progress.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            bar.lock().expect("bar lock").update(progress.snapshot());
        }
    })
}

async fn run_alone<S: Scenario>(scenario: &S) -> (S::Partial, Measured) {
    let progress = Arc::new(Progress::default());
    let bar = Arc::new(std::sync::Mutex::new(Bar::new(scenario.connections())));
    let drawing = draw(&bar, &progress);
    let mut meter = Meter::start(&scenario.common().gateway_pids);
    let mut prepared = scenario.prepare(Worker::ALONE, progress.clone()).await;
    let ramp = meter.lap();
    bar.lock().expect("bar lock").phase("run");
    let partial = scenario.run(&mut prepared, Worker::ALONE, progress).await;
    let run = meter.lap();
    let gateways = meter.memory();
    drop(prepared);
    drawing.abort();
    bar.lock().expect("bar lock").finish();
    (
        partial,
        Measured {
            ramp,
            run,
            gateways,
        },
    )
}

/// One line a worker prints on stdout.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "line", rename_all = "snake_case")]
enum WorkerLine {
    Progress(Snapshot),
    Ready,
    Done { partial: serde_json::Value },
}

fn say(line: &WorkerLine) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // The coordinator reads whole lines; if it is gone, the next read of stdin ends us.
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string(line).expect("line serializes")
    );
    let _ = out.flush();
}

async fn serve_as_worker<S: Scenario>(scenario: &S, worker: Worker) -> ExitCode {
    let progress = Arc::new(Progress::default());
    let reporting = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            loop {
                tick.tick().await;
                say(&WorkerLine::Progress(progress.snapshot()));
            }
        })
    };
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    let mut prepared = scenario.prepare(worker, progress.clone()).await;
    say(&WorkerLine::Ready);
    match commands.next_line().await {
        Ok(Some(line)) if line == "go" => {}
        _ => return ExitCode::FAILURE, // the coordinator gave up
    }
    let partial = scenario.run(&mut prepared, worker, progress.clone()).await;
    reporting.abort();
    say(&WorkerLine::Progress(progress.snapshot()));
    say(&WorkerLine::Done {
        partial: serde_json::to_value(partial).expect("partial serializes"),
    });
    // Hold the connections until the coordinator has measured the gateways.
    while let Ok(Some(_)) = commands.next_line().await {}
    drop(prepared);
    ExitCode::SUCCESS
}

struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::UnboundedReceiver<(usize, Option<WorkerLine>)>,
}

impl Workers {
    fn spawn(count: u32) -> Result<Workers, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        let (tx, lines) = mpsc::unbounded_channel();
        let (mut children, mut stdins) = (Vec::new(), Vec::new());
        for index in 0..count {
            let mut child = Command::new(&exe)
                .args(&args)
                .arg(format!("--worker={index}/{count}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start worker {index}: {e}"))?;
            stdins.push(child.stdin.take().expect("piped stdin"));
            let stdout = child.stdout.take().expect("piped stdout");
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut out = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = out.next_line().await {
                    match serde_json::from_str(&line) {
                        Ok(parsed) => drop(tx.send((index as usize, Some(parsed)))),
                        Err(e) => eprintln!("loadtest: worker {index} said {line:?}: {e}"),
                    }
                }
                let _ = tx.send((index as usize, None));
            });
            children.push(child);
        }
        Ok(Workers {
            children,
            stdins,
            lines,
        })
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// Waits until every worker has said `done` (or `ready`), updating the bar meanwhile;
    /// returns the partial results. A worker that stops before saying it is an error.
    async fn wait_all(
        &mut self,
        bar: &mut Bar,
        progress: &mut [Snapshot],
        want_done: bool,
    ) -> Result<Vec<serde_json::Value>, String> {
        let mut pending = self.children.len();
        let mut partials = Vec::new();
        while pending > 0 {
            let Some((index, line)) = self.lines.recv().await else {
                return Err("workers vanished".into());
            };
            match line {
                Some(WorkerLine::Progress(p)) => {
                    progress[index] = p;
                    bar.update(progress.iter().fold(Snapshot::default(), |a, b| a + *b));
                }
                Some(WorkerLine::Ready) if !want_done => pending -= 1,
                Some(WorkerLine::Done { partial }) if want_done => {
                    partials.push(partial);
                    pending -= 1;
                }
                Some(_) => return Err(format!("worker {index} is out of step")),
                None => return Err(format!("worker {index} stopped early")),
            }
        }
        Ok(partials)
    }

    async fn tell_all(&mut self, command: &str) -> Result<(), String> {
        for (index, stdin) in self.stdins.iter_mut().enumerate() {
            stdin
                .write_all(format!("{command}\n").as_bytes())
                .await
                .map_err(|e| format!("worker {index}: {e}"))?;
        }
        Ok(())
    }

    /// Lets the workers close their connections and exit.
    async fn release(mut self) -> Result<(), String> {
        self.stdins.clear();
        for (index, child) in self.children.iter_mut().enumerate() {
            let status = child.wait().await.map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("worker {index} exited with {status}"));
            }
        }
        Ok(())
    }
}

async fn coordinate<S: Scenario>(scenario: &S) -> Result<(S::Partial, Measured), String> {
    let common = scenario.common();
    let mut bar = Bar::new(scenario.connections());
    let mut progress = vec![Snapshot::default(); common.procs as usize];
    let mut meter = Meter::start(&common.gateway_pids);
    let mut workers = Workers::spawn(common.procs)?;
    meter.add_loadtest_pids(&workers.pids());
    workers.wait_all(&mut bar, &mut progress, false).await?;
    let ramp = meter.lap();
    bar.phase("run");
    workers.tell_all("go").await?;
    let partials = workers.wait_all(&mut bar, &mut progress, true).await?;
    let run = meter.lap();
    let gateways = meter.memory();
    workers.release().await?;
    bar.finish();
    let mut total = S::Partial::default();
    for partial in partials {
        let part = serde_json::from_value(partial).map_err(|e| format!("worker result: {e}"))?;
        S::merge(&mut total, part);
    }
    Ok((
        total,
        Measured {
            ramp,
            run,
            gateways,
        },
    ))
}

/// Prints the report, writes the JSON if asked, and turns errors and losses into the exit code.
fn finish<R: Serialize + std::fmt::Display>(common: &Common, outcome: Outcome<R>) -> ExitCode {
    print!("{}", outcome.report);
    if let Some(path) = &common.json {
        let json = serde_json::to_string_pretty(&outcome.report).expect("report serializes");
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("loadtest: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let mut code = ExitCode::SUCCESS;
    if outcome.errors > common.max_errors {
        eprintln!(
            "loadtest: {} errors (allowed: {})",
            outcome.errors, common.max_errors
        );
        code = ExitCode::FAILURE;
    }
    if outcome.losses > common.max_loss {
        eprintln!(
            "loadtest: {} messages lost, duplicated or reordered (allowed: {})",
            outcome.losses, common.max_loss
        );
        code = ExitCode::FAILURE;
    }
    code
}
