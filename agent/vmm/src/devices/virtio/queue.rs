//! Split-virtqueue service with every guest value checked: the loop that takes available
//! descriptor chains and returns them used ([`serve_queue`]), the structural checks of one chain
//! ([`Chain::parse`]), and copies between guest buffers and files or host memory.
//!
//! The `virtio-queue` crate reads the rings and follows `next` links with a bound on the chain
//! length (loops end after `queue size` descriptors), but it ends a chain silently when a link
//! is bad. [`Chain::parse`] turns that into an error, so a device never serves half a request.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Chains served per notification before the rest is deferred to the next turn of the event
/// loop, so that a guest that keeps its queue full cannot starve the other devices.
pub const CHAINS_PER_TURN: usize = 256;

/// One guest buffer of a chain, as the descriptor gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain that is structurally sound: it ends where its last descriptor says, and its
/// device-readable buffers all come before its device-writable ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub readable: Vec<Buffer>,
    pub writable: Vec<Buffer>,
}

/// Why a chain cannot be served at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor chain has no descriptors (bad head or indirect table)")]
    Empty,
    #[error("descriptor chain does not end after {0} descriptors: a loop, a next index past the table, or an unreadable descriptor")]
    Unterminated(usize),
    #[error("descriptor {0} is device-readable but follows a device-writable one")]
    ReadableAfterWritable(usize),
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

impl Chain {
    /// Walks `chain` to its end. The walk itself is bounded by virtio-queue (at most the queue
    /// size, or the indirect table's size, of descriptors; at most 4 GiB in total).
    pub fn parse<M>(chain: DescriptorChain<M>) -> Result<Chain, ChainError>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let mut parsed = Chain::default();
        let mut last: Option<Descriptor> = None;
        let mut count = 0usize;
        for desc in chain {
            count += 1;
            let buffer = Buffer {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                parsed.writable.push(buffer);
            } else if parsed.writable.is_empty() {
                parsed.readable.push(buffer);
            } else {
                return Err(ChainError::ReadableAfterWritable(count - 1));
            }
            last = Some(desc);
        }
        match last {
            None => Err(ChainError::Empty),
            // The walk stopped although the last descriptor links on: virtio-queue refused the
            // link (loop, index out of range, descriptor outside memory, length overflow).
            Some(desc) if desc.has_next() => Err(ChainError::Unterminated(count)),
            Some(_) => Ok(parsed),
        }
    }

    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }
}

/// The sum of the buffers' lengths (cannot overflow: at most 2^16 buffers of < 2^32 bytes).
pub fn total_len(buffers: &[Buffer]) -> u64 {
    buffers.iter().map(|b| u64::from(b.len)).sum()
}

/// Checks that every buffer lies entirely in guest RAM (no wrap, no hole, no MMIO gap).
pub fn check_in_memory(mem: &GuestMemoryMmap, buffers: &[Buffer]) -> Result<(), ChainError> {
    for buffer in buffers {
        let in_memory = buffer.len == 0
            || (buffer.addr.checked_add(u64::from(buffer.len)).is_some()
                && GuestMemoryBackend::check_range(mem, buffer.addr, buffer.len as usize));
        if !in_memory {
            return Err(ChainError::OutsideMemory {
                addr: buffer.addr.raw_value(),
                len: buffer.len,
            });
        }
    }
    Ok(())
}

/// The pieces of guest memory that make up bytes `[offset, offset + len)` of `buffers` taken
/// end to end. Stops early if the buffers are shorter, or at a piece whose address would wrap
/// past the end of the address space (the buffers may not have been checked yet: virtio-blk
/// locates its status byte first).
pub fn pieces(buffers: &[Buffer], offset: u64, len: u64) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    let mut skip = offset;
    let mut want = len;
    for buffer in buffers {
        if want == 0 {
            break;
        }
        let blen = u64::from(buffer.len);
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let take = (blen - skip).min(want);
        let Some(addr) = buffer.addr.checked_add(skip) else {
            break;
        };
        out.push((addr, take as usize));
        want -= take;
        skip = 0;
    }
    out
}

/// Errors moving data between guest buffers and the host.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("guest memory at {addr:#x}+{len:#x}: {source}")]
    Guest {
        addr: u64,
        len: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the buffers hold {have} bytes, {want} needed")]
    Short { have: u64, want: u64 },
    #[error("file at offset {offset}: {source}")]
    File {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

fn exact_pieces(
    buffers: &[Buffer],
    offset: u64,
    len: u64,
) -> Result<Vec<(GuestAddress, usize)>, IoError> {
    let have = total_len(buffers).saturating_sub(offset);
    if have < len {
        return Err(IoError::Short { have, want: len });
    }
    Ok(pieces(buffers, offset, len))
}

/// Reads `out.len()` bytes at `offset` of `buffers` into host memory.
pub fn read_from_guest(
    mem: &GuestMemoryMmap,
    buffers: &[Buffer],
    offset: u64,
    out: &mut [u8],
) -> Result<(), IoError> {
    let mut done = 0;
    for (addr, len) in exact_pieces(buffers, offset, out.len() as u64)? {
        mem.read_slice(&mut out[done..done + len], addr)
            .map_err(|source| IoError::Guest {
                addr: addr.raw_value(),
                len,
                source,
            })?;
        done += len;
    }
    Ok(())
}

/// Writes `data` at `offset` of `buffers`.
pub fn write_to_guest(
    mem: &GuestMemoryMmap,
    buffers: &[Buffer],
    offset: u64,
    data: &[u8],
) -> Result<(), IoError> {
    let mut done = 0;
    for (addr, len) in exact_pieces(buffers, offset, data.len() as u64)? {
        mem.write_slice(&data[done..done + len], addr)
            .map_err(|source| IoError::Guest {
                addr: addr.raw_value(),
                len,
                source,
            })?;
        done += len;
    }
    Ok(())
}

/// Reads `len` bytes of `file` at `file_offset` straight into bytes `[offset, offset+len)` of
/// `buffers` (no bounce buffer: the guest cannot make the VMM allocate).
pub fn file_to_guest(
    mem: &GuestMemoryMmap,
    buffers: &[Buffer],
    offset: u64,
    len: u64,
    file: &mut File,
    file_offset: u64,
) -> Result<(), IoError> {
    let file_err = |source| IoError::File {
        offset: file_offset,
        source,
    };
    file.seek(SeekFrom::Start(file_offset)).map_err(file_err)?;
    for (addr, len) in exact_pieces(buffers, offset, len)? {
        let mut done = 0;
        while done < len {
            let at = addr.unchecked_add(done as u64);
            let n = mem
                .read_volatile_from(at, file, len - done)
                .map_err(|source| IoError::Guest {
                    addr: at.raw_value(),
                    len: len - done,
                    source,
                })?;
            if n == 0 {
                return Err(file_err(std::io::ErrorKind::UnexpectedEof.into()));
            }
            done += n;
        }
    }
    Ok(())
}

/// Writes bytes `[offset, offset+len)` of `buffers` to `file` at `file_offset`.
pub fn guest_to_file(
    mem: &GuestMemoryMmap,
    buffers: &[Buffer],
    offset: u64,
    len: u64,
    file: &mut File,
    file_offset: u64,
) -> Result<(), IoError> {
    file.seek(SeekFrom::Start(file_offset))
        .map_err(|source| IoError::File {
            offset: file_offset,
            source,
        })?;
    for (addr, len) in exact_pieces(buffers, offset, len)? {
        mem.write_all_volatile_to(addr, file, len)
            .map_err(|source| IoError::Guest {
                addr: addr.raw_value(),
                len,
                source,
            })?;
    }
    Ok(())
}

/// Whether the driver wants an interrupt for the used entries added since the last call: with
/// `VIRTIO_RING_F_EVENT_IDX`, as its `used_event` says (virtio-queue's
/// `needs_notification`); without, unless the available ring's flags say
/// `VRING_AVAIL_F_NO_INTERRUPT` (virtio 1.x, 2.7.7.2: the device should not interrupt then),
/// which virtio-queue does not read. A poll-mode driver sets it and takes no interrupts.
pub fn needs_interrupt(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    // Always called: it also resets virtio-queue's count of entries added.
    let wanted = queue.needs_notification(mem)?;
    if !wanted || queue.event_idx_enabled() {
        return Ok(wanted);
    }
    // The ring was checked to be in guest memory when the queue was set up; if the flags
    // cannot be read anyway, interrupt.
    let flags = mem
        .load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map(u16::from_le)
        .unwrap_or(0);
    Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
}

/// What one call of [`serve_queue`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Chains taken from the available ring (returned used, or kept by the device).
    pub chains: usize,
    /// The driver asked for an interrupt ([`needs_interrupt`]).
    pub interrupt: bool,
    /// Chains are left because the per-turn budget ran out.
    pub more: bool,
}

/// Serves the available chains of `queue`: each is parsed and handed to `serve`, which returns
/// the number of bytes it wrote into the chain; the chain then goes to the used ring.
///
/// A malformed chain is still returned used (with what `serve` reports), so the driver gets its
/// descriptors back. What cannot be answered per chain — an available index that runs more
/// than a queue size ahead, rings the device cannot read or write — is an error: the queue is
/// broken and the device needs a reset.
pub fn serve_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut serve: F,
) -> Result<Served, virtio_queue::Error>
where
    F: FnMut(Result<Chain, ChainError>) -> u32,
{
    serve_queue_deferred(queue, mem, CHAINS_PER_TURN, |_, chain| Some(serve(chain)))
}

/// [`serve_queue`] for a device that may answer a chain later: `serve` gets the chain's head
/// too and returns `None` for a chain it keeps, which the device returns used itself once done.
/// Takes at most `budget` chains (and never more than [`CHAINS_PER_TURN`]); `more` says the
/// budget stopped it.
pub fn serve_queue_deferred<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    budget: usize,
    mut serve: F,
) -> Result<Served, virtio_queue::Error>
where
    F: FnMut(u16, Result<Chain, ChainError>) -> Option<u32>,
{
    let budget = budget.min(CHAINS_PER_TURN);
    let mut served = Served::default();
    let mut used = 0usize;
    let mut batch = Vec::new();
    'turn: loop {
        queue.disable_notification(mem)?;
        loop {
            if served.chains >= budget {
                served.more = true;
                break 'turn;
            }
            // What the driver has made available, as of one read of its index: the index
            // shares a cache line with the ring the driver keeps writing, so reading it once
            // per batch rather than once per chain saves a cross-core miss per request.
            batch.extend(queue.iter(mem)?.take(budget - served.chains));
            if batch.is_empty() {
                break;
            }
            let size = queue.size();
            for chain in batch.drain(..) {
                let head = chain.head_index();
                if head >= size {
                    // Nothing to return: the used ring can only name descriptors of the table.
                    tracing::warn!(
                        head,
                        size,
                        "available ring names a descriptor past the table; skipped"
                    );
                    continue;
                }
                served.chains += 1;
                if let Some(used_len) = serve(head, Chain::parse(chain)) {
                    queue.add_used(mem, head, used_len)?;
                    used += 1;
                }
            }
        }
        // Re-enable notifications, then look again: a chain made available in between would
        // otherwise wait for the next notification, which the driver will not send.
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    if used > 0 {
        served.interrupt = needs_interrupt(queue, mem)?;
    }
    Ok(served)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn pieces_span_buffers_and_skip_the_offset() {
        let bufs = [buf(0x1000, 16), buf(0x2000, 512), buf(0x3000, 1)];
        assert_eq!(
            pieces(&bufs, 16, 513),
            vec![(GuestAddress(0x2000), 512), (GuestAddress(0x3000), 1)]
        );
        assert_eq!(
            pieces(&bufs, 10, 10),
            vec![(GuestAddress(0x100a), 6), (GuestAddress(0x2000), 4)]
        );
        assert!(pieces(&bufs, 1000, 10).is_empty());
    }

    #[test]
    fn pieces_never_wrap_past_the_end_of_the_address_space() {
        // Found by fuzzing (virtio_blk): the status byte of a buffer that starts 16 bytes
        // below 2^64 lay at a wrapped, in-memory address.
        let bufs = [buf(u64::MAX - 15, 0x1000)];
        assert_eq!(pieces(&bufs, 8, 1), vec![(GuestAddress(u64::MAX - 7), 1)]);
        assert!(pieces(&bufs, 0x20, 1).is_empty());
    }

    #[test]
    fn buffers_outside_memory_or_wrapping_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
        assert!(check_in_memory(&mem, &[buf(0, 0x10000)]).is_ok());
        assert!(check_in_memory(&mem, &[buf(0xffff, 2)]).is_err());
        assert!(check_in_memory(&mem, &[buf(u64::MAX - 1, 0x10)]).is_err());
        assert!(check_in_memory(&mem, &[buf(0x20000, 1)]).is_err());
        // An empty buffer touches nothing.
        assert!(check_in_memory(&mem, &[buf(u64::MAX, 0)]).is_ok());
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
        let mut queue = Queue::new(16).expect("queue");
        queue
            .try_set_desc_table_address(GuestAddress(0x1000))
            .expect("desc");
        queue
            .try_set_avail_ring_address(GuestAddress(0x2000))
            .expect("avail");
        queue
            .try_set_used_ring_address(GuestAddress(0x3000))
            .expect("used");
        queue.set_ready(true);
        for (flags, want) in [(VRING_AVAIL_F_NO_INTERRUPT as u16, false), (0, true)] {
            mem.write_obj(flags.to_le(), GuestAddress(0x2000))
                .expect("flags");
            queue.add_used(&mem, 0, 0).expect("used");
            assert_eq!(
                needs_interrupt(&mut queue, &mem).expect("read"),
                want,
                "{flags}"
            );
        }
        // With EVENT_IDX the flag means nothing: used_event decides, here "after entry 2".
        queue.set_event_idx(true);
        mem.write_obj(1u16.to_le(), GuestAddress(0x2000))
            .expect("flags");
        mem.write_obj(2u16.to_le(), GuestAddress(0x2000 + 4 + 2 * 16))
            .expect("used_event");
        queue.add_used(&mem, 0, 0).expect("used");
        assert!(needs_interrupt(&mut queue, &mem).expect("read"));
    }

    #[test]
    fn short_buffers_are_an_error_not_a_partial_copy() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
        let err = write_to_guest(&mem, &[buf(0x100, 4)], 0, &[1; 8]).expect_err("short");
        assert!(matches!(err, IoError::Short { have: 4, want: 8 }), "{err}");
    }
}
