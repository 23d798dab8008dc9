//! A WebSocket's socket on its shard's event loop, on whichever engine the loop runs.

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use crate::transport::Socket;

use super::epoll::EpollSocket;
use super::uring::UringSocket;

pub enum LoopSocket {
    Epoll(EpollSocket),
    Uring(UringSocket),
}

impl LoopSocket {
    pub fn epoll(&self) -> Option<&EpollSocket> {
        match self {
            LoopSocket::Epoll(socket) => Some(socket),
            LoopSocket::Uring(_) => None,
        }
    }

    /// It is closing: what it reads is read as it is needed, not ahead (io_uring's multishot
    /// receives would read ahead of a peer streaming at it; epoll reads only when asked).
    pub fn read_only_as_needed(&self) {
        if let LoopSocket::Uring(socket) = self {
            socket.pace_for_good();
        }
    }

    pub fn uring(&self) -> Option<&UringSocket> {
        match self {
            LoopSocket::Uring(socket) => Some(socket),
            LoopSocket::Epoll(_) => None,
        }
    }
}

impl Socket for LoopSocket {
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            LoopSocket::Epoll(socket) => socket.poll_recv(cx, buf),
            LoopSocket::Uring(socket) => socket.poll_recv(cx, buf),
        }
    }

    fn poll_send(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self {
            LoopSocket::Epoll(socket) => socket.poll_send(cx, bufs),
            LoopSocket::Uring(socket) => socket.poll_send(cx, bufs),
        }
    }

    fn poll_shutdown_send(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            LoopSocket::Epoll(socket) => socket.poll_shutdown_send(cx),
            LoopSocket::Uring(socket) => socket.poll_shutdown_send(cx),
        }
    }
}
