//! Compiles the fabric.v1 protobuf files without `protoc`: `protox` parses
//! them into a `FileDescriptorSet` (kept in `OUT_DIR` for server reflection),
//! and `tonic-prost-build` generates the messages, clients and servers.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Root of the .proto tree; import paths ("fabric/v1/types.proto") are
/// relative to it.
const PROTO_ROOT: &str = "proto";

/// File in `OUT_DIR` holding the encoded descriptor set (see `lib.rs`).
const DESCRIPTOR_SET_FILE: &str = "fabric_v1_descriptor_set.bin";

fn main() {
    if let Err(error) = generate() {
        // A build script reports by panicking; the message is what the
        // developer sees, so make it the whole explanation.
        panic!("fabric-proto build: {error}");
    }
}

fn generate() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    println!("cargo:rerun-if-changed=build.rs");

    let mut proto_files = Vec::new();
    collect_proto_files(Path::new(PROTO_ROOT), &mut proto_files)
        .map_err(|e| format!("listing {PROTO_ROOT}/: {e}"))?;
    proto_files.sort();
    if proto_files.is_empty() {
        return Err(format!("no .proto files under {PROTO_ROOT}/").into());
    }
    for file in &proto_files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    // Source info keeps the .proto comments, which become the rustdoc of the
    // generated code; imports (google/protobuf/*) are included so that the
    // descriptor set is self-contained for reflection clients.
    let mut compiler = protox::Compiler::new([PROTO_ROOT])?;
    compiler.include_source_info(true).include_imports(true);
    for file in &proto_files {
        compiler
            .open_file(file)
            .map_err(|e| describe_protox_error(file, &e))?;
    }

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join(DESCRIPTOR_SET_FILE);
    fs::write(&descriptor_path, compiler.encode_file_descriptor_set())
        .map_err(|e| format!("writing {}: {e}", descriptor_path.display()))?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

/// "file: message" for a protox error found while compiling `opened`; the
/// error may concern an imported file rather than `opened` itself.
fn describe_protox_error(opened: &Path, error: &protox::Error) -> String {
    match error.file() {
        Some(file) => format!("{PROTO_ROOT}/{file}: {error}"),
        None => format!("{}: {error}", opened.display()),
    }
}

/// Appends every `.proto` file under `dir`, recursively, to `out`.
fn collect_proto_files(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_proto_files(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
