//! virtio-blk (virtio 1.x, section 5.2) over a raw disk image file: read, write, flush
//! (`fdatasync`) and get-id, one request queue.
//!
//! Every request is checked before the file is touched: a 16-byte device-readable header, the
//! device-readable part before the device-writable one, a device-writable status byte at the
//! very end, data lengths in whole 512-byte sectors, the sector range inside the disk, every
//! buffer inside guest RAM, and data buffers in the direction the request type needs. A request
//! that fails a check completes with `VIRTIO_BLK_S_IOERR` (`UNSUPP` for unknown types) and the
//! device serves the next one; one whose status byte cannot be found or written is returned
//! with length 0. Data moves between the file and guest memory without a host bounce buffer.
//!
//! A read-only disk is opened read-only, offers `VIRTIO_BLK_F_RO`, and fails writes with
//! `IOERR`.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::queue::{
    check_in_memory, file_to_guest, guest_to_file, read_from_guest, serve_queue, write_to_guest,
    Chain, ChainError,
};
use super::{
    read_config_bytes, single_ready_queue, ActivateError, DeviceError, Interrupt, VirtioDevice,
};

/// Bytes per sector: the unit of `sector` in requests and of `capacity` in the config space.
pub const SECTOR_SIZE: u64 = 512;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The request header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: u64 = 16;
/// Length of the configuration space we expose: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_LEN: usize = 24;
/// After this many warnings about malformed requests, further ones go to debug level.
const REQUEST_WARNINGS: u32 = 32;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    // The OS error is in the message, not a `source`: anyhow's `{:#}` would print it twice.
    #[error("--disk {path}: cannot open: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("--disk {path}: not a regular file or block device")]
    NotADisk { path: PathBuf },
}

/// Opens a disk image the way the device will use it (read-only for `read_only`), checking that
/// it is a regular file or a block device. Returns the file and its size in bytes.
pub fn open_disk(path: &Path, read_only: bool) -> Result<(File, u64), BlockError> {
    let open_err = |error| BlockError::Open {
        path: path.to_owned(),
        error,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(open_err)?;
    let file_type = file.metadata().map_err(open_err)?.file_type();
    use std::os::unix::fs::FileTypeExt;
    if !(file_type.is_file() || file_type.is_block_device()) {
        return Err(BlockError::NotADisk {
            path: path.to_owned(),
        });
    }
    // Seeking to the end measures block devices too, whose metadata length is 0.
    let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
    Ok((file, size))
}

/// The disk image and what requests are checked against.
struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// Size in sectors; a partial sector at the end of the file is not part of the disk.
    capacity: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    warnings_left: u32,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
}

/// A virtio block device.
pub struct Block {
    disk: Disk,
    config: [u8; CONFIG_LEN],
    features: u64,
    active: Option<Active>,
}

/// A request refused before or during I/O, with the status it completes with.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("{0}")]
    Malformed(String),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} not supported")]
    Unsupported(u32),
    #[error(transparent)]
    Io(#[from] super::queue::IoError),
    #[error("fdatasync: {0}")]
    Flush(#[source] std::io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

fn malformed(what: impl Into<String>) -> RequestError {
    RequestError::Malformed(what.into())
}

/// A 20-byte serial number naming the image file (device and inode), NUL-padded.
fn serial_for(file: &File) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let text = match file.metadata() {
        Ok(meta) => {
            let long = format!("fabric-{:x}-{:x}", meta.dev(), meta.ino());
            if long.len() <= serial.len() {
                long
            } else {
                // Keep the inode end, which is what differs between images on one filesystem.
                let short = format!("{:x}-{:x}", meta.dev(), meta.ino());
                short[short.len().saturating_sub(serial.len())..].to_string()
            }
        }
        Err(_) => "fabric-disk".to_string(),
    };
    let n = text.len().min(serial.len());
    serial[..n].copy_from_slice(&text.as_bytes()[..n]);
    serial
}

impl Block {
    /// Opens the image at `path` (read-only if `read_only`).
    pub fn open(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let (file, size) = open_disk(path, read_only)?;
        Ok(Block::from_file(file, path, size, read_only))
    }

    fn from_file(file: File, path: &Path, size: u64, read_only: bool) -> Block {
        let capacity = size / SECTOR_SIZE;
        if !size.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                path = %path.display(),
                size,
                "disk image is not a whole number of sectors; the tail is not visible"
            );
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // seg_max: a request uses two descriptors besides its data (header and status).
        config[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        let mut features = (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        Block {
            disk: Disk {
                serial: serial_for(&file),
                file,
                path: path.to_owned(),
                read_only,
                capacity,
                warnings_left: REQUEST_WARNINGS,
            },
            config,
            features,
            active: None,
        }
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }
}

impl Disk {
    /// Serves one request; returns the bytes written into the chain's buffers.
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: Result<Chain, ChainError>) -> u32 {
        let chain = match chain {
            Ok(chain) => chain,
            Err(error) => {
                self.warn(&error.to_string());
                return 0;
            }
        };
        // The status byte is the last byte the device may write; without one nothing can be
        // reported, so nothing is written at all.
        let writable_len = chain.writable_len();
        let Some(status_at) = writable_len.checked_sub(1) else {
            self.warn("request without a device-writable status byte");
            return 0;
        };
        let status_piece = super::queue::pieces(&chain.writable, status_at, 1);
        let status_buffers: Vec<_> = status_piece
            .iter()
            .map(|&(addr, len)| super::queue::Buffer {
                addr,
                len: len as u32,
            })
            .collect();
        if status_buffers.is_empty() || check_in_memory(mem, &status_buffers).is_err() {
            self.warn("status byte outside guest memory");
            return 0;
        }
        let (status, used) = match self.execute(mem, &chain, status_at) {
            Ok(data_written) => (VIRTIO_BLK_S_OK as u8, data_written),
            Err(error) => {
                self.warn(&error.to_string());
                (error.status(), 0)
            }
        };
        if let Err(error) = write_to_guest(mem, &status_buffers, 0, &[status]) {
            self.warn(&format!("cannot write the status byte: {error}"));
            return 0;
        }
        // `used` is at most the writable length less one, which fits in u32.
        (used + 1) as u32
    }

    /// Checks and runs a request whose status byte is at `status_at` of the writable part.
    /// Returns the data bytes written into guest memory.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &Chain,
        status_at: u64,
    ) -> Result<u64, RequestError> {
        check_in_memory(mem, &chain.readable).map_err(|e| malformed(e.to_string()))?;
        check_in_memory(mem, &chain.writable).map_err(|e| malformed(e.to_string()))?;
        let readable_len = chain.readable_len();
        if readable_len < HEADER_LEN {
            return Err(malformed(format!(
                "request header is {readable_len} device-readable bytes, {HEADER_LEN} needed"
            )));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        read_from_guest(mem, &chain.readable, 0, &mut header)?;
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        // What lies between the header and the status byte, by direction.
        let readable_data = readable_len - HEADER_LEN;
        let writable_data = status_at;

        match request_type {
            VIRTIO_BLK_T_IN => {
                if readable_data != 0 {
                    return Err(malformed(format!(
                        "read request with {readable_data} device-readable data bytes"
                    )));
                }
                let offset = self.check_range(sector, writable_data)?;
                file_to_guest(
                    mem,
                    &chain.writable,
                    0,
                    writable_data,
                    &mut self.file,
                    offset,
                )?;
                Ok(writable_data)
            }
            VIRTIO_BLK_T_OUT => {
                if writable_data != 0 {
                    return Err(malformed(format!(
                        "write request with {writable_data} device-writable data bytes"
                    )));
                }
                let offset = self.check_range(sector, readable_data)?;
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                guest_to_file(
                    mem,
                    &chain.readable,
                    HEADER_LEN,
                    readable_data,
                    &mut self.file,
                    offset,
                )?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if readable_data != 0 || writable_data != 0 {
                    return Err(malformed("flush request with data buffers"));
                }
                self.file.sync_data().map_err(RequestError::Flush)?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if readable_data != 0 {
                    return Err(malformed("get-id request with device-readable data"));
                }
                let n = writable_data.min(self.serial.len() as u64) as usize;
                write_to_guest(mem, &chain.writable, 0, &self.serial[..n])?;
                Ok(n as u64)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Checks that `len` bytes from `sector` are whole sectors inside the disk; returns the
    /// byte offset in the file.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(malformed(format!(
                "data length {len} is not a multiple of {SECTOR_SIZE}"
            )));
        }
        let end = sector.checked_add(len / SECTOR_SIZE);
        match end {
            Some(end) if end <= self.capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(malformed(format!(
                "sectors {sector}+{} past the end of the disk ({} sectors)",
                len / SECTOR_SIZE,
                self.capacity
            ))),
        }
    }

    fn warn(&mut self, error: &str) {
        if self.warnings_left > 0 {
            self.warnings_left -= 1;
            tracing::warn!(disk = %self.path.display(), error, "virtio-blk: request refused");
        } else {
            tracing::debug!(disk = %self.path.display(), error, "virtio-blk: request refused");
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config_len(&self) -> u64 {
        CONFIG_LEN as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
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
        let disk = &mut self.disk;
        let mem = &active.mem;
        let served = serve_queue(&mut active.queue, mem, |chain| disk.serve(mem, chain))
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
    use crate::vmm::devices::virtio::test_driver::{TestDriver, DATA_AREA, R, W};
    use std::io::{Read, Write};
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = DATA_AREA;
    const DATA: u64 = DATA_AREA + 0x1000;
    const STATUS: u64 = DATA_AREA + 0x800;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    struct Fixture {
        d: TestDriver,
        image: tempfile::NamedTempFile,
        served: u16,
    }

    /// A 64 KiB image whose sector n is filled with byte n.
    fn fixture(read_only: bool) -> Fixture {
        let mut image = tempfile::NamedTempFile::new().expect("image");
        for sector in 0..128u8 {
            image.write_all(&[sector; 512]).expect("fill");
        }
        image.flush().expect("flush");
        let block = Block::open(image.path(), read_only).expect("open");
        assert_eq!(block.capacity(), 128);
        Fixture {
            d: TestDriver::running(Box::new(block)),
            image,
            served: 0,
        }
    }

    impl Fixture {
        fn header(&mut self, request_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&request_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.d
                .mem
                .write_slice(&h, GuestAddress(HDR))
                .expect("header");
            // A status the device must overwrite.
            self.d
                .mem
                .write_obj(0xffu8, GuestAddress(STATUS))
                .expect("status");
        }

        /// Submits a chain, lets the device run; returns (status byte, used length).
        fn submit(&mut self, buffers: &[(u64, u32, u16)]) -> (u8, u32) {
            let head = self.d.add_chain(0, buffers);
            self.d.notify(0);
            assert_eq!(self.d.used_idx(0), self.served + 1, "request was returned");
            let (id, len) = self.d.used(0, self.served);
            assert_eq!(id, u32::from(head));
            self.served += 1;
            let status: u8 = self.d.mem.read_obj(GuestAddress(STATUS)).expect("status");
            (status, len)
        }

        fn read_sectors(&mut self, sector: u64, count: u32) -> (u8, u32) {
            self.header(VIRTIO_BLK_T_IN, sector);
            self.submit(&[(HDR, 16, R), (DATA, count * 512, W), (STATUS, 1, W)])
        }

        /// A good read after whatever came before: the device still serves.
        fn assert_still_serves(&mut self) {
            self.d
                .mem
                .write_slice(&[0u8; 512], GuestAddress(DATA))
                .expect("clear");
            assert_eq!(self.read_sectors(7, 1), (OK, 513));
            let mut data = [0u8; 512];
            self.d
                .mem
                .read_slice(&mut data, GuestAddress(DATA))
                .expect("data");
            assert_eq!(data, [7u8; 512]);
        }

        fn file_sector(&self, sector: u64) -> Vec<u8> {
            let mut file = File::open(self.image.path()).expect("image");
            file.seek(SeekFrom::Start(sector * 512)).expect("seek");
            let mut data = vec![0u8; 512];
            file.read_exact(&mut data).expect("read");
            data
        }
    }

    #[test]
    fn config_space_announces_capacity_and_features() {
        let mut f = fixture(true);
        assert_eq!(f.d.read_config(0, 4), 128u32.to_le_bytes());
        assert_eq!(f.d.read_config(4, 4), [0; 4]);
        assert_eq!(f.d.read_config(12, 4), 254u32.to_le_bytes());
        let ro = Block::open(f.image.path(), true).expect("ro");
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let rw = Block::open(f.image.path(), false).expect("rw");
        assert_eq!(rw.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    }

    #[test]
    fn read_write_flush_and_get_id_reach_the_file() {
        let mut f = fixture(false);
        // Read two sectors split over two buffers.
        f.header(VIRTIO_BLK_T_IN, 3);
        let (status, len) = f.submit(&[
            (HDR, 16, R),
            (DATA, 512, W),
            (DATA + 0x2000, 512, W),
            (STATUS, 1, W),
        ]);
        assert_eq!((status, len), (OK, 1025));
        let mut data = [0u8; 512];
        f.d.mem
            .read_slice(&mut data, GuestAddress(DATA + 0x2000))
            .expect("read");
        assert_eq!(data, [4u8; 512]);

        // Write a pattern to sector 9, from a buffer that holds header and data together.
        let mut pattern = vec![0u8; 16 + 512];
        pattern[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        pattern[8..16].copy_from_slice(&9u64.to_le_bytes());
        for (i, b) in pattern[16..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        f.d.mem
            .write_slice(&pattern, GuestAddress(DATA))
            .expect("pattern");
        f.d.mem
            .write_obj(0xffu8, GuestAddress(STATUS))
            .expect("status");
        assert_eq!(f.submit(&[(DATA, 16 + 512, R), (STATUS, 1, W)]), (OK, 1));
        assert_eq!(f.file_sector(9), pattern[16..]);

        f.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(f.submit(&[(HDR, 16, R), (STATUS, 1, W)]), (OK, 1));

        f.header(VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            f.submit(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]),
            (OK, 21)
        );
        let mut id = [0u8; 20];
        f.d.mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert!(
            id.starts_with(b"fabric-") || id.iter().any(|&b| b != 0),
            "{id:?}"
        );
        assert_eq!(f.d.take_interrupt() & 1, 1);
    }

    #[test]
    fn a_read_only_disk_fails_writes_and_keeps_its_data() {
        let mut f = fixture(true);
        f.d.mem
            .write_slice(&[0xaa; 512], GuestAddress(DATA))
            .expect("data");
        f.header(VIRTIO_BLK_T_OUT, 5);
        assert_eq!(
            f.submit(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        assert_eq!(f.file_sector(5), vec![5u8; 512]);
        f.assert_still_serves();
    }

    #[test]
    fn bad_lengths_and_ranges_fail_with_ioerr() {
        let mut f = fixture(false);
        // Not a whole sector.
        f.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            f.submit(&[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        // Past the end of the disk, and a sector number that overflows.
        assert_eq!(f.read_sectors(127, 2).0, IOERR);
        assert_eq!(f.read_sectors(u64::MAX, 1).0, IOERR);
        assert_eq!(f.read_sectors(u64::MAX / 512 + 1, 1).0, IOERR);
        // The last sector is fine.
        assert_eq!(f.read_sectors(127, 1), (OK, 513));
        // A short header.
        f.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            f.submit(&[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        // An unknown request type.
        f.header(0x77, 0);
        assert_eq!(f.submit(&[(HDR, 16, R), (STATUS, 1, W)]), (UNSUPP, 1));
        f.assert_still_serves();
    }

    #[test]
    fn buffers_outside_guest_memory_or_overflowing_are_refused() {
        let mut f = fixture(false);
        let end = f.d.mem_size();
        let cases: [(u64, u32); 4] = [
            (end - 256, 512),       // runs off the end of RAM
            (1 << 40, 512),         // far outside
            (u64::MAX - 511, 1024), // address + length wraps
            (0xd000_0000, 512),     // the MMIO gap
        ];
        for (addr, len) in cases {
            f.header(VIRTIO_BLK_T_IN, 0);
            let got = f.submit(&[(HDR, 16, R), (addr, len, W), (STATUS, 1, W)]);
            assert_eq!(got, (IOERR, 1), "{addr:#x}+{len:#x}");
        }
        // A write whose data is outside memory must not reach the file.
        f.header(VIRTIO_BLK_T_OUT, 2);
        let got = f.submit(&[(HDR, 16, R), (end - 256, 512, R), (STATUS, 1, W)]);
        assert_eq!(got, (IOERR, 1));
        assert_eq!(f.file_sector(2), vec![2u8; 512]);
        // A header outside memory.
        let got = f.submit(&[(1 << 40, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(got, (IOERR, 1));
        // A status byte outside memory cannot be reported: returned with length 0.
        f.header(VIRTIO_BLK_T_IN, 0);
        let head =
            f.d.add_chain(0, &[(HDR, 16, R), (DATA, 512, W), (1 << 40, 1, W)]);
        f.d.notify(0);
        assert_eq!(f.d.used(0, f.served), (u32::from(head), 0));
        f.served += 1;
        f.assert_still_serves();
        // Found by fuzzing: a writable buffer that runs past 2^64 put the status byte at a
        // wrapped address (here 0xfff, inside guest RAM; an overflow panic in debug builds).
        f.header(VIRTIO_BLK_T_IN, 0);
        f.d.mem
            .write_obj(0xeeu8, GuestAddress(0xfff))
            .expect("canary");
        let head =
            f.d.add_chain(0, &[(HDR, 16, R), (u64::MAX - 0xfff, 0x2000, W)]);
        f.d.notify(0);
        assert_eq!(f.d.used(0, f.served), (u32::from(head), 0));
        f.served += 1;
        let canary: u8 = f.d.mem.read_obj(GuestAddress(0xfff)).expect("canary");
        assert_eq!(canary, 0xee, "status written at a wrapped address");
        f.assert_still_serves();
    }

    #[test]
    fn wrong_directions_are_refused() {
        let mut f = fixture(false);
        // Read with a device-readable data buffer.
        f.header(VIRTIO_BLK_T_IN, 1);
        assert_eq!(
            f.submit(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        // Write with a device-writable data buffer (the device would write guest memory).
        f.header(VIRTIO_BLK_T_OUT, 1);
        assert_eq!(
            f.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        assert_eq!(f.file_sector(1), vec![1u8; 512]);
        // A device-writable header: the device finds no header to read.
        f.header(VIRTIO_BLK_T_IN, 1);
        assert_eq!(
            f.submit(&[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        // A device-readable status byte: nowhere to report, returned with length 0.
        f.header(VIRTIO_BLK_T_IN, 1);
        assert_eq!(
            f.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]),
            (0xff, 0)
        );
        // Readable after writable.
        f.header(VIRTIO_BLK_T_IN, 1);
        assert_eq!(
            f.submit(&[
                (HDR, 16, R),
                (DATA, 512, W),
                (DATA + 512, 16, R),
                (STATUS, 1, W)
            ]),
            (0xff, 0)
        );
        f.assert_still_serves();
    }

    #[test]
    fn loops_and_dangling_links_are_returned_unused() {
        let mut f = fixture(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 2 -> 1 -> ...: a loop behind a good start.
        f.d.write_desc(0, 0, HDR, 16, R | 1, 1);
        f.d.write_desc(0, 1, DATA, 512, W | 1, 2);
        f.d.write_desc(0, 2, STATUS, 1, W | 1, 1);
        f.d.push_avail(0, 0);
        f.d.notify(0);
        assert_eq!(f.d.used(0, 0), (0, 0));
        // A link past the table.
        f.d.write_desc(0, 3, HDR, 16, R | 1, 4000);
        f.d.push_avail(0, 3);
        f.d.notify(0);
        assert_eq!(f.d.used(0, 1), (3, 0));
        // Lengths that add up past 4 GiB (the u32 sum overflows).
        f.d.write_desc(0, 5, HDR, 16, R | 1, 6);
        f.d.write_desc(0, 6, DATA, u32::MAX - 8, W | 1, 7);
        f.d.write_desc(0, 7, STATUS, 16, W, 0);
        f.d.push_avail(0, 5);
        f.d.notify(0);
        assert_eq!(f.d.used(0, 2), (5, 0));
        let status: u8 = f.d.mem.read_obj(GuestAddress(STATUS)).expect("status");
        assert_eq!(status, 0xff, "nothing was written for malformed chains");
        f.served = 3;
        // Skip the descriptors used above; the fixture's next chain starts at 0 again,
        // which is fine now that the device has returned them.
        f.assert_still_serves();
    }

    #[test]
    fn a_queue_size_not_a_power_of_two_is_refused() {
        let image = tempfile::NamedTempFile::new().expect("image");
        image.as_file().set_len(4096).expect("size");
        let block = Block::open(image.path(), false).expect("open");
        let mut d = TestDriver::new(Box::new(block));
        d.init();
        d.write_reg(0x30, 0);
        d.write_reg(0x38, 100);
        d.write_reg(0x38, 512);
        // The size stays at the maximum; a proper set-up then works.
        d.setup_queue(0, 128);
        d.driver_ok();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
        d.mem.write_slice(&h, GuestAddress(HDR)).expect("header");
        d.add_chain(0, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
        d.notify(0);
        assert_eq!(d.used(0, 0).1, 21);
    }

    #[test]
    fn open_errors_name_the_path() {
        let err = Block::open(Path::new("/nonexistent/disk.img"), true)
            .err()
            .expect("missing");
        assert_eq!(
            err.to_string(),
            "--disk /nonexistent/disk.img: cannot open: No such file or directory (os error 2)"
        );
        let dir = tempfile::tempdir().expect("dir");
        let err = Block::open(dir.path(), true).err().expect("directory");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
