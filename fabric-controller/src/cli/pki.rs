//! `fabricctl pki`: the cluster's certificate authority and the certificates it issues.
//! Nothing here talks to the controller: it reads and writes files in directories the
//! operator names, private keys readable by their owner only (0600) and never printed.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fabric_proto::tls::{self, Identity, Issued, TlsFiles, CA_FILE, CA_KEY_FILE};

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a cluster CA, the controller's certificate and a first admin's certificate, in a
    /// new directory: ca.pem, ca-key.pem, controller.pem, controller-key.pem, ADMIN.pem,
    /// ADMIN-key.pem. Keep ca-key.pem with the admins; give the controller its three files.
    Init(InitArgs),
    /// Issue a certificate from the CA in --ca-dir, into a directory of its own: ca.pem and,
    /// for a host, host.pem and host-key.pem; for a user NAME.pem and NAME-key.pem; for the
    /// controller controller.pem and controller-key.pem.
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The cluster's name (1..=63 of a-z, 0-9, -): part of every identity.
    #[arg(long)]
    pub cluster: String,
    /// The directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// DNS names the controller is reached at (besides fabric-controller, which clients
    /// verify).
    #[arg(long = "controller-dns", value_name = "NAME")]
    pub controller_dns: Vec<String>,
    /// IP addresses the controller is reached at.
    #[arg(long = "controller-ip", value_name = "IP")]
    pub controller_ip: Vec<IpAddr>,
    /// The first admin's name.
    #[arg(long, default_value = "admin")]
    pub admin: String,
    /// How long the CA is valid.
    #[arg(long, default_value = "3650d", value_parser = parse_duration)]
    pub ca_ttl: Duration,
    /// How long the controller's and the admin's certificates are valid.
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    pub ttl: Duration,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The directory `pki init` made (ca.pem and ca-key.pem).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Where to write the certificate (made if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// For the host of this name.
    #[arg(long, group = "who")]
    pub host: Option<String>,
    /// For the user of this name.
    #[arg(long, group = "who")]
    pub user: Option<String>,
    /// For the controller (its certificate: for renewal, or a second address).
    #[arg(long = "for-controller", group = "who")]
    pub for_controller: bool,
    /// DNS names the controller is reached at (with --for-controller).
    #[arg(long = "controller-dns", value_name = "NAME")]
    pub controller_dns: Vec<String>,
    /// IP addresses the controller is reached at (with --for-controller).
    #[arg(long = "controller-ip", value_name = "IP")]
    pub controller_ip: Vec<IpAddr>,
    /// How long the certificate is valid.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
}

/// `90s`, `15m`, `24h`, `365d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("a number and a unit: s, m, h or d (e.g. 24h)")?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a number and a unit: s, m, h or d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    let total = n
        .checked_mul(seconds)
        .filter(|s| *s > 0 && *s <= 100 * 365 * 86_400)
        .ok_or_else(|| format!("{text:?}: from 1 s to 100 years"))?;
    Ok(Duration::from_secs(total))
}

/// A user name whose files would take the place of the CA's, the controller's or a host's
/// in a TLS directory.
pub(crate) fn check_file_name(name: &str) -> anyhow::Result<()> {
    if matches!(name, "ca" | "controller" | "host") || name.ends_with("-key") {
        anyhow::bail!(
            "{name:?}: a user may not be called ca, controller, host or *-key (its files would replace those)"
        );
    }
    Ok(())
}

pub(crate) fn write_files(
    dir: &Path,
    name: &str,
    ca_pem: &str,
    issued: &Issued,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = TlsFiles::in_dir(dir, name);
    std::fs::write(&files.ca, ca_pem)
        .with_context(|| format!("cannot write {}", files.ca.display()))?;
    std::fs::write(&files.cert, &issued.cert_pem)
        .with_context(|| format!("cannot write {}", files.cert.display()))?;
    tls::write_private(&files.key, &issued.key_pem)
        .with_context(|| format!("cannot write {}", files.key.display()))?;
    println!("{} ({})", files.cert.display(), name);
    Ok(())
}

pub(crate) fn issue(
    ca: &Issued,
    cluster: &str,
    identity: &Identity,
    dns: &[String],
    ips: &[IpAddr],
    ttl: Duration,
) -> anyhow::Result<Issued> {
    tls::issue(
        ca,
        cluster,
        &tls::Request {
            identity,
            dns_names: dns,
            ips,
            backdate: crate::join::MAX_BACKDATE,
            lifetime: ttl,
        },
    )
    .map_err(anyhow::Error::msg)
}

/// The CA of `ca_dir` (ca.pem, ca-key.pem) and its cluster.
pub(crate) fn read_ca(ca_dir: &Path) -> anyhow::Result<(Issued, String)> {
    let ca_files = TlsFiles::in_dir(ca_dir, "ca");
    let cluster = ca_files.cluster().map_err(anyhow::Error::msg)?;
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    Ok((
        Issued {
            cert_pem: read(ca_dir.join(CA_FILE))?,
            key_pem: read(ca_dir.join(CA_KEY_FILE))?,
        },
        cluster,
    ))
}

pub fn run(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init(args) => {
            tls::check_name("cluster", &args.cluster).map_err(anyhow::Error::msg)?;
            tls::check_name("admin", &args.admin).map_err(anyhow::Error::msg)?;
            check_file_name(&args.admin)?;
            if args.out.join(CA_KEY_FILE).exists() {
                anyhow::bail!(
                    "{} already holds a CA: pki init never replaces one",
                    args.out.display()
                );
            }
            let ca = tls::new_ca(&args.cluster, args.ca_ttl).map_err(anyhow::Error::msg)?;
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("cannot create {}", args.out.display()))?;
            tls::write_private(&args.out.join(CA_KEY_FILE), &ca.key_pem)
                .with_context(|| format!("cannot write the CA key in {}", args.out.display()))?;
            let controller = issue(
                &ca,
                &args.cluster,
                &Identity::Controller,
                &args.controller_dns,
                &args.controller_ip,
                args.ttl,
            )?;
            write_files(&args.out, "controller", &ca.cert_pem, &controller)?;
            let admin = issue(
                &ca,
                &args.cluster,
                &Identity::User(args.admin.clone()),
                &[],
                &[],
                args.ttl,
            )?;
            write_files(&args.out, &args.admin, &ca.cert_pem, &admin)?;
            println!(
                "{} (cluster {})",
                args.out.join(CA_FILE).display(),
                args.cluster
            );
            Ok(())
        }
        PkiCommand::Issue(args) => {
            let ca_files = TlsFiles::in_dir(&args.ca_dir, "ca");
            let cluster = ca_files.cluster().map_err(anyhow::Error::msg)?;
            let read = |path: PathBuf| {
                std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))
            };
            let ca = Issued {
                cert_pem: read(args.ca_dir.join(CA_FILE))?,
                key_pem: read(args.ca_dir.join(CA_KEY_FILE))?,
            };
            let (identity, file) = match (&args.host, &args.user, args.for_controller) {
                (Some(host), None, false) => (Identity::Host(host.clone()), "host".to_string()),
                (None, Some(user), false) => {
                    check_file_name(user)?;
                    (Identity::User(user.clone()), user.clone())
                }
                (None, None, true) => (Identity::Controller, "controller".to_string()),
                _ => anyhow::bail!("give one of --host NAME, --user NAME or --for-controller"),
            };
            if let Identity::Host(name) | Identity::User(name) = &identity {
                tls::check_name("host or user", name).map_err(anyhow::Error::msg)?;
            }
            let issued = issue(
                &ca,
                &cluster,
                &identity,
                &args.controller_dns,
                &args.controller_ip,
                args.ttl,
            )?;
            write_files(&args.out, &file, &ca.cert_pem, &issued)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        // Clap checks its definition only when asked: a subcommand flag that shadows a
        // global one of another type (as --controller once did) panics at run time.
        <crate::cli::Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn user_files_never_replace_the_cas_or_a_daemons() {
        for bad in ["ca", "controller", "host", "ca-key", "alice-key"] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
        assert!(check_file_name("alice").is_ok());
    }

    #[test]
    fn durations_have_a_unit_and_a_bound() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(
            parse_duration("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        for bad in ["", "24", "h", "0s", "1y", "-1h", "99999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
