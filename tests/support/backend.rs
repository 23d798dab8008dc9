#![allow(dead_code)] // shared by test binaries, each using its part
//! An application backend for the proxy tests: a real HTTP/1.1 server (hyper) on a loopback port,
//! on a thread of its own, answering each POST as the test says and keeping what it was sent.
//! It can be stopped (its port refuses, its keep-alive connections close) and started again on
//! the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::oneshot;

/// How the backend answers one call.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    /// How long it waits before answering.
    pub delay: Duration,
}

impl Answer {
    /// 200 with `body` (JSON), at once.
    pub fn json(body: Value) -> Answer {
        Answer {
            status: 200,
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    /// `{"result": {}}`.
    pub fn allow() -> Answer {
        Answer::json(serde_json::json!({ "result": {} }))
    }

    pub fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

type Answering = Arc<Mutex<Box<dyn Fn(&Value) -> Answer + Send>>>;

/// One request as the backend got it.
#[derive(Clone, Debug)]
pub struct Call {
    /// Its headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Its body, as sent, and as JSON (null when it is not).
    pub raw: Bytes,
    pub body: Value,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    /// Every call, in the order they came.
    calls: Arc<Mutex<Vec<Call>>>,
    answering: Answering,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Backend {
    /// A backend on a free port answering every call with `answer`.
    pub fn start(answer: impl Fn(&Value) -> Answer + Send + 'static) -> Backend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut backend = Backend {
            addr: listener.local_addr().unwrap(),
            calls: Arc::default(),
            answering: Arc::new(Mutex::new(Box::new(answer))),
            running: None,
        };
        backend.serve(listener);
        backend
    }

    /// The URL of `path` on this backend.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The body of every call, in the order they came.
    pub fn calls(&self) -> Vec<Value> {
        self.requests().into_iter().map(|call| call.body).collect()
    }

    /// Every call, with its headers and raw body.
    pub fn requests(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Answers from now on with `answer`.
    pub fn answer_with(&self, answer: impl Fn(&Value) -> Answer + Send + 'static) {
        *self.answering.lock().unwrap() = Box::new(answer);
    }

    /// Stops serving: the port refuses connections, open ones are closed.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            thread.join().unwrap();
        }
    }

    /// Serves again, on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&self.addr.into()).unwrap();
        socket.listen(128).unwrap();
        self.serve(socket.into());
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = oneshot::channel();
        let (calls, answering) = (self.calls.clone(), self.answering.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Dropping the runtime at the end closes every connection it served.
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let accepting = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let (calls, answering) = (calls.clone(), answering.clone());
                        let service = hyper::service::service_fn(move |req| {
                            answer(req, calls.clone(), answering.clone())
                        });
                        tokio::spawn(
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service),
                        );
                    }
                };
                tokio::select! {
                    () = accepting => {}
                    _ = stopped => {}
                }
            });
        });
        self.running = Some((stop, thread));
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn answer(
    req: Request<Incoming>,
    calls: Arc<Mutex<Vec<Call>>>,
    answering: Answering,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let headers = req
        .headers()
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect();
    let raw = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let answer = (answering.lock().unwrap())(&body);
    calls.lock().unwrap().push(Call { headers, raw, body });
    tokio::time::sleep(answer.delay).await;
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = hyper::StatusCode::from_u16(answer.status).unwrap();
    Ok(response)
}
