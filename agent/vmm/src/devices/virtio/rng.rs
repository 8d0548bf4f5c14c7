//! virtio-rng (virtio 1.x, section 5.4): one queue of device-writable buffers that the device
//! fills with bytes from the host's `getrandom(2)`.
//!
//! At most [`MAX_BYTES_PER_REQUEST`] bytes are written per request, through a fixed host
//! buffer, whatever lengths the guest's descriptors claim: a guest cannot make the VMM allocate
//! or spend unbounded time on one request. A request with a device-readable buffer or a buffer
//! outside guest memory is returned unused (length 0).

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::queue::{
    check_in_memory, pieces, serve_queue, total_len, write_to_guest, Chain, ChainError,
};
use super::{single_ready_queue, ActivateError, DeviceError, Interrupt, VirtioDevice};

/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most entropy one request gets.
pub const MAX_BYTES_PER_REQUEST: u64 = 64 * 1024;
/// Host buffer the bytes pass through.
const CHUNK: usize = 4096;

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)` without flags: blocks only until the
/// host's pool is initialised, which it is long before a VM starts).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // nix has no getrandom.
        // SAFETY: `rest` is a live, exclusively borrowed byte buffer of `rest.len()` bytes; the
        // kernel writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
}

/// The entropy device.
pub struct Rng {
    active: Option<Active>,
    /// Logged once, when the guest first asks: proof in the VMM log that a driver is using it.
    announced: bool,
    chunk: Vec<u8>,
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

impl Rng {
    pub fn new() -> Rng {
        Rng {
            active: None,
            announced: false,
            chunk: vec![0; CHUNK],
        }
    }
}

/// Serves one request: fills its writable buffers, returns the bytes written.
fn fill_request(mem: &GuestMemoryMmap, chunk: &mut [u8], chain: Result<Chain, ChainError>) -> u32 {
    let chain = match chain {
        Ok(chain) => chain,
        Err(error) => {
            tracing::warn!(%error, "virtio-rng: malformed request refused");
            return 0;
        }
    };
    if !chain.readable.is_empty() {
        tracing::warn!("virtio-rng: request with a device-readable buffer refused");
        return 0;
    }
    if let Err(error) = check_in_memory(mem, &chain.writable) {
        tracing::warn!(%error, "virtio-rng: request refused");
        return 0;
    }
    let want = total_len(&chain.writable).min(MAX_BYTES_PER_REQUEST);
    let mut written = 0u64;
    for (addr, len) in pieces(&chain.writable, 0, want) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len());
            if let Err(error) = fill_random(&mut chunk[..n]) {
                tracing::error!(%error, "virtio-rng: getrandom failed");
                return written as u32;
            }
            let at = super::queue::Buffer {
                addr,
                len: len as u32,
            };
            if let Err(error) = write_to_guest(mem, &[at], done as u64, &chunk[..n]) {
                tracing::warn!(%error, "virtio-rng: cannot write the guest's buffer");
                return written as u32;
            }
            done += n;
            written += n as u64;
        }
    }
    // `written <= MAX_BYTES_PER_REQUEST`, which fits in u32.
    written as u32
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &'static str {
        "virtio-rng"
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config_len(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let queue = single_ready_queue(queues)?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notified(&mut self, index: usize) -> Result<bool, DeviceError> {
        let Some(active) = self.active.as_mut().filter(|_| index == 0) else {
            return Err(DeviceError::NoSuchQueue(index));
        };
        if !self.announced {
            self.announced = true;
            tracing::info!("virtio-rng: guest requested entropy");
        }
        let chunk = &mut self.chunk;
        let mem = &active.mem;
        let served = serve_queue(&mut active.queue, mem, |chain| {
            fill_request(mem, chunk, chain)
        })
        .map_err(|source| DeviceError::Queue { queue: 0, source })?;
        if served.interrupt {
            active.interrupt.signal_used_queue();
        }
        Ok(served.more)
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::{TestDriver, DATA_AREA, R, W};
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    use vm_memory::{Bytes, GuestAddress};

    fn driver() -> TestDriver {
        TestDriver::running(Box::new(Rng::new()))
    }

    fn good_request(d: &mut TestDriver, n: u16) {
        d.mem
            .write_slice(&[0u8; 64], GuestAddress(DATA_AREA))
            .expect("clear");
        let head = d.add_chain(0, &[(DATA_AREA, 64, W)]);
        d.notify(0);
        assert_eq!(d.used_idx(0), n + 1, "the good request was served");
        assert_eq!(d.used(0, n), (u32::from(head), 64));
        let mut bytes = [0u8; 64];
        d.mem
            .read_slice(&mut bytes, GuestAddress(DATA_AREA))
            .expect("read");
        assert!(
            bytes.iter().any(|&b| b != 0),
            "64 random bytes are not all zero"
        );
        assert_eq!(d.take_interrupt() & 1, 1);
    }

    #[test]
    fn fills_buffers_and_bounds_each_request() {
        let mut d = driver();
        good_request(&mut d, 0);
        // Two buffers of 1 MiB each: only 64 KiB are written.
        let head = d.add_chain(
            0,
            &[(DATA_AREA, 1 << 20, W), (DATA_AREA + (1 << 20), 1 << 20, W)],
        );
        d.notify(0);
        assert_eq!(
            d.used(0, 1),
            (u32::from(head), MAX_BYTES_PER_REQUEST as u32)
        );
        good_request(&mut d, 2);
    }

    #[test]
    fn readable_or_outside_buffers_are_refused_and_the_device_keeps_serving() {
        let mut d = driver();
        let cases: [&[(u64, u32, u16)]; 4] = [
            &[(DATA_AREA, 64, R)],
            &[(DATA_AREA, 64, W), (DATA_AREA + 64, 64, R)],
            &[(d.mem_size() - 8, 64, W)],
            &[(u64::MAX - 16, 64, W)],
        ];
        for (n, buffers) in cases.iter().enumerate() {
            let head = d.add_chain(0, buffers);
            d.notify(0);
            assert_eq!(d.used(0, n as u16), (u32::from(head), 0), "case {n}");
        }
        good_request(&mut d, cases.len() as u16);
    }

    #[test]
    fn a_descriptor_loop_is_returned_unused() {
        let mut d = driver();
        // 0 -> 1 -> 0 -> ...
        d.write_desc(0, 0, DATA_AREA, 16, W | 1, 1);
        d.write_desc(0, 1, DATA_AREA + 16, 16, W | 1, 0);
        d.push_avail(0, 0);
        d.notify(0);
        assert_eq!(d.used(0, 0), (0, 0));
        // A next index past the table.
        d.write_desc(0, 2, DATA_AREA, 16, W | 1, 999);
        d.push_avail(0, 2);
        d.notify(0);
        assert_eq!(d.used(0, 1), (2, 0));
        // A head past the table is skipped (nothing to return).
        d.push_avail(0, 300);
        d.notify(0);
        assert_eq!(d.used_idx(0), 2);
        // Fresh descriptors for the good request.
        d.write_desc(0, 3, DATA_AREA, 64, W, 0);
        d.push_avail(0, 3);
        d.notify(0);
        assert_eq!(d.used(0, 2), (3, 64));
    }

    #[test]
    fn an_available_index_far_ahead_needs_a_reset_then_works_again() {
        let mut d = driver();
        d.set_avail_idx(0, 1000);
        d.notify(0);
        assert_eq!(d.used_idx(0), 0);
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(d.take_interrupt() & 2, 2, "config-change interrupt");
        // Notifications of a broken device are ignored.
        d.notify(0);
        assert_eq!(d.used_idx(0), 0);
        // The driver resets and starts over.
        d.write_reg(0x70, 0);
        assert_eq!(d.status(), 0);
        d.init();
        d.setup_queue(0, QUEUE_SIZE);
        d.driver_ok();
        good_request(&mut d, 0);
    }

    #[test]
    fn getrandom_fills_large_buffers() {
        let mut buf = vec![0u8; 100_000];
        fill_random(&mut buf).expect("getrandom");
        assert!(buf[99_000..].iter().any(|&b| b != 0));
    }
}
