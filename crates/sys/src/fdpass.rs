//! Length-prefixed frames over a unix stream socket, with file descriptors attached (`SCM_RIGHTS`).
//!
//! The daemon hands pipe ends to a sandbox's init this way, and the zygote hands the daemon each init's control
//! socket. A frame is a little-endian `u32` length followed by that many bytes; descriptors travel with the first
//! byte of the frame, so a receiver that reads the 4-byte header first always gets them.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most descriptors one frame may carry.
pub const MAX_FDS: usize = 252;
/// Largest frame accepted; protects both ends from a corrupt length.
pub const MAX_FRAME: usize = 64 << 20;

/// Writes the first part of a frame (header and as much payload as the socket takes) with `fds` attached.
/// Returns how many bytes of `header ++ payload` went out; the caller writes the rest with plain writes.
pub fn sendmsg_with_fds(
    sock: BorrowedFd<'_>,
    header: &[u8],
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one frame",
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small"));
    }
    let iov = [IoSlice::new(header), IoSlice::new(payload)];
    Ok(sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)?)
}

/// Reads up to `buf.len()` bytes, collecting any descriptors that arrive with them.
pub fn recvmsg_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    Ok(msg.bytes)
}

/// Frame header for a payload.
pub fn frame_header(payload: &[u8]) -> io::Result<[u8; 4]> {
    if payload.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    Ok((payload.len() as u32).to_le_bytes())
}

/// Blocking: sends one frame with descriptors.
pub fn send_frame(sock: impl AsFd, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let sock = sock.as_fd();
    let header = frame_header(payload)?;
    let mut sent = loop {
        match sendmsg_with_fds(sock, &header, payload, fds) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    let total = header.len() + payload.len();
    while sent < total {
        let rest = if sent < 4 {
            &header[sent..]
        } else {
            &payload[sent - 4..]
        };
        match rustix::io::write(sock, rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Blocking: receives one frame and its descriptors. `Ok(None)` on a clean end of stream.
pub fn recv_frame(sock: impl AsFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let sock = sock.as_fd();
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match recvmsg_with_fds(sock, &mut header[got..], &mut fds) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut payload = vec![0u8; len];
    let mut file = FdReader(sock);
    file.read_exact(&mut payload)?;
    Ok(Some((payload, fds)))
}

struct FdReader<'a>(BorrowedFd<'a>);

impl Read for FdReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::io::read(self.0, &mut *buf) {
                Err(rustix::io::Errno::INTR) => continue,
                r => return Ok(r?),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn frame_round_trip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        send_frame(&a, b"hello", &[r.as_fd(), w.as_fd()]).unwrap();
        let (payload, fds) = recv_frame(&b).unwrap().unwrap();
        assert_eq!(payload, b"hello");
        assert_eq!(fds.len(), 2);
        rustix::io::write(&fds[1], b"x").unwrap();
        let mut c = [0u8; 1];
        rustix::io::read(&fds[0], &mut c).unwrap();
        assert_eq!(&c, b"x");
    }

    #[test]
    fn large_frame_crosses_socket_buffer() {
        let (a, b) = UnixStream::pair().unwrap();
        let big = vec![7u8; 1 << 20];
        let t = std::thread::spawn(move || send_frame(&a, &big, &[]).unwrap());
        let (payload, fds) = recv_frame(&b).unwrap().unwrap();
        t.join().unwrap();
        assert_eq!(payload.len(), 1 << 20);
        assert!(fds.is_empty());
        drop(b);
    }

    #[test]
    fn eof_is_none() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(recv_frame(&b).unwrap().is_none());
    }
}
