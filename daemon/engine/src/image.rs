//! Resolves a plan's image to a rootfs folder and its digest.
//!
//! - A rootfs folder: its tree digest (`blake3:<hex>`, see [`crate::digest`]),
//!   cached by path and validated by a stat-only walk
//!   ([`crate::digest::tree_digest_cached`]).
//! - `oci:DIR:TAG`: the manifest named TAG in DIR's `index.json`; its digest
//!   (`sha256:<hex>`) is the image digest. Every blob read is checked against
//!   its descriptor (size and sha256), layers also against the config's
//!   `diff_ids`. The layers are unpacked in order, whiteouts applied, into
//!   `cache_dir/oci/sha256-<hex>/rootfs` (a `-`, not a `:`, because a colon
//!   breaks overlayfs `lowerdir=` options). Unpacking happens in a temporary
//!   sibling folder that is renamed into place, so a crash never leaves a
//!   half-unpacked entry; a later resolve of the same manifest is a cache hit.
//!   Nothing is fsynced (too slow on a busy host); instead the entry records
//!   its tree digest and the boot it was written in, and the first use after
//!   a reboot re-digests it (a power loss may have emptied files) and
//!   unpacks again if it changed.
//!
//! Layer safety: entries with `..` components are rejected, absolute names
//! are taken relative to the rootfs (never the host), and nothing is ever
//! written through a symlink (a parent that is a symlink
//! is rejected, files are created with `O_NOFOLLOW`-equivalent `create_new`
//! after removing what was there). Ownership is kept when running as root.
//! Not applied: extended attributes (PAX `SCHILY.xattr.*`, e.g. file
//! capabilities).

use crate::digest::{self, DigestError};
use liminal_plan::ImageRef;
use oci_spec::image::{
    Descriptor, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest, MediaType,
    ANNOTATION_REF_NAME,
};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

/// Version of the unpacker's output; bump when the unpacked tree would differ
/// (e.g. once xattrs are applied), so old cache entries are replaced.
const UNPACK_VERSION: u32 = 1;
/// Name of the marker written next to a finished `rootfs`.
const MARKER: &str = "liminal-unpacked.json";
/// Upper bounds for JSON blobs read into memory.
const MAX_INDEX_BYTES: u64 = 4 << 20;
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// A resolved image: the rootfs folder the sandbox uses and the image digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    pub rootfs: PathBuf,
    /// `blake3:<hex>` tree digest for a rootfs folder, `sha256:<hex>` manifest
    /// digest for an OCI image.
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image rootfs {}: {source}", path.display())]
    MissingRootfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image rootfs {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("image rootfs digest: {0}")]
    Digest(#[from] DigestError),
    #[error("{} is not an OCI image layout: {message}", layout.display())]
    NotALayout { layout: PathBuf, message: String },
    #[error("OCI image {}: malformed {what}: {message}", layout.display())]
    Malformed {
        layout: PathBuf,
        what: String,
        message: String,
    },
    #[error("OCI image {}: tag {tag:?} not found; tags present: {}", layout.display(), fmt_tags(available))]
    TagNotFound {
        layout: PathBuf,
        tag: String,
        available: Vec<String>,
    },
    #[error("OCI image {}: tag {tag:?} has no manifest for {os}/{arch}", layout.display())]
    NoMatchingPlatform {
        layout: PathBuf,
        tag: String,
        os: String,
        arch: String,
    },
    #[error("OCI image {}: blob {digest}: {source}", layout.display())]
    MissingBlob {
        layout: PathBuf,
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("OCI image {}: blob {digest} has {actual} bytes, its descriptor says {expected}", layout.display())]
    SizeMismatch {
        layout: PathBuf,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("OCI image {}: blob {expected} has digest {actual} (corrupt or tampered)", layout.display())]
    DigestMismatch {
        layout: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("OCI image {}: layer {layer} unpacks to {actual}, the config's diff_id is {expected}", layout.display())]
    DiffIdMismatch {
        layout: PathBuf,
        layer: String,
        expected: String,
        actual: String,
    },
    #[error("OCI image {}: unsupported digest algorithm in {digest} (only sha256)", layout.display())]
    UnsupportedDigest { layout: PathBuf, digest: String },
    #[error("OCI image {}: {digest}: unsupported media type {media_type}", layout.display())]
    UnsupportedMediaType {
        layout: PathBuf,
        digest: String,
        media_type: String,
    },
    #[error("OCI image {}: layer {layer}: unsafe path {path:?}: {reason}", layout.display())]
    UnsafePath {
        layout: PathBuf,
        layer: String,
        path: String,
        reason: &'static str,
    },
    #[error("OCI image {}: layer {layer}: cannot unpack {path:?}: {source}", layout.display())]
    Unpack {
        layout: PathBuf,
        layer: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("image cache {}: {source}", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn fmt_tags(tags: &[String]) -> String {
    if tags.is_empty() {
        "none".to_owned()
    } else {
        tags.join(", ")
    }
}

/// Resolves a plan's image to a rootfs folder and its digest, unpacking OCI
/// images into `cache_dir/oci/` once.
pub fn resolve(image: &ImageRef, cache_dir: &Path) -> Result<ResolvedImage, ImageError> {
    match image {
        ImageRef::Rootfs { path } => resolve_rootfs(path, cache_dir),
        ImageRef::Oci { layout, tag } => {
            let _span = tracing::info_span!("oci_image", layout = %layout.display(), tag).entered();
            Oci { layout }.resolve(tag, cache_dir)
        }
    }
}

fn resolve_rootfs(path: &Path, cache_dir: &Path) -> Result<ResolvedImage, ImageError> {
    let md = fs::metadata(path).map_err(|source| ImageError::MissingRootfs {
        path: path.to_owned(),
        source,
    })?;
    if !md.is_dir() {
        return Err(ImageError::NotADirectory {
            path: path.to_owned(),
        });
    }
    let rootfs = fs::canonicalize(path).map_err(|source| ImageError::MissingRootfs {
        path: path.to_owned(),
        source,
    })?;
    let started = Instant::now();
    let digest = digest::tree_digest_cached_canonical(&rootfs, cache_dir)?;
    tracing::debug!(rootfs = %rootfs.display(), %digest, ms = started.elapsed().as_millis() as u64, "rootfs digest");
    Ok(ResolvedImage { rootfs, digest })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    unpacker: u32,
    manifest: String,
    layers: Vec<String>,
    /// Tree digest of `rootfs` right after unpacking.
    tree: String,
    /// The boot the tree was last known good in (see [`cache_state`]).
    boot_id: String,
}

/// What a cache entry is good for.
enum CacheState {
    Missing,
    Ready,
    /// Complete, but written or last checked before the last boot: files
    /// are not fsynced when unpacking (see [`Oci::unpack`]), so a power loss
    /// since may have emptied some. One tree digest tells.
    Unverified(Marker),
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

struct Oci<'a> {
    layout: &'a Path,
}

impl Oci<'_> {
    fn malformed(&self, what: impl Into<String>, message: impl ToString) -> ImageError {
        ImageError::Malformed {
            layout: self.layout.to_owned(),
            what: what.into(),
            message: message.to_string(),
        }
    }

    fn resolve(&self, tag: &str, cache_dir: &Path) -> Result<ResolvedImage, ImageError> {
        let layout_file = self.layout.join("oci-layout");
        let header = fs::read(&layout_file).map_err(|e| ImageError::NotALayout {
            layout: self.layout.to_owned(),
            message: format!("cannot read {}: {e}", layout_file.display()),
        })?;
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| self.malformed("oci-layout", e))?;
        if header
            .get("imageLayoutVersion")
            .and_then(|v| v.as_str())
            .is_none()
        {
            return Err(self.malformed("oci-layout", "no imageLayoutVersion"));
        }
        let index_path = self.layout.join("index.json");
        let index_bytes =
            read_bounded(&index_path, MAX_INDEX_BYTES).map_err(|e| ImageError::NotALayout {
                layout: self.layout.to_owned(),
                message: format!("cannot read {}: {e}", index_path.display()),
            })?;
        let index = ImageIndex::from_reader(&index_bytes[..])
            .map_err(|e| self.malformed("index.json", e))?;

        let manifest_desc = self.find_manifest(&index, tag)?;
        let manifest_digest = manifest_desc.digest().to_string();
        let manifest_bytes = self.read_blob(&manifest_desc, MAX_INDEX_BYTES)?;
        let manifest = ImageManifest::from_reader(&manifest_bytes[..])
            .map_err(|e| self.malformed(format!("manifest {manifest_digest}"), e))?;

        let oci_dir = cache_dir.join("oci");
        let entry = oci_dir.join(format!("sha256-{}", manifest_desc.digest().digest()));
        let rootfs = entry.join("rootfs");
        if let CacheState::Ready = cache_state(&entry) {
            tracing::debug!(rootfs = %rootfs.display(), "OCI image cache hit");
            return Ok(ResolvedImage {
                rootfs,
                digest: manifest_digest,
            });
        }

        // One unpacker per image at a time (other runs of the daemon, other
        // processes): the others wait, then find the entry ready.
        fs::create_dir_all(&oci_dir).map_err(|source| ImageError::Cache {
            path: oci_dir.clone(),
            source,
        })?;
        let lock_path = oci_dir.join(format!(".lock-{}", manifest_desc.digest().digest()));
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| ImageError::Cache {
                path: lock_path.clone(),
                source,
            })?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::Cache {
                path: lock_path.clone(),
                source: e.into(),
            })?;
        let usable = match cache_state(&entry) {
            CacheState::Ready => true,
            CacheState::Unverified(marker) => verify_after_reboot(&entry, marker),
            CacheState::Missing => false,
        };
        if usable {
            tracing::debug!(rootfs = %rootfs.display(), "OCI image cache hit (after waiting or checking)");
            return Ok(ResolvedImage {
                rootfs,
                digest: manifest_digest,
            });
        }
        let started = Instant::now();
        self.unpack(&manifest, &manifest_digest, &oci_dir, &entry)?;
        tracing::info!(rootfs = %rootfs.display(), ms = started.elapsed().as_millis() as u64, "OCI image unpacked");
        Ok(ResolvedImage {
            rootfs,
            digest: manifest_digest,
        })
    }

    /// The manifest descriptor for `tag`, descending into a nested index by
    /// platform (linux and this machine's architecture).
    fn find_manifest(&self, index: &ImageIndex, tag: &str) -> Result<Descriptor, ImageError> {
        let ref_name = |d: &Descriptor| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_REF_NAME))
                .cloned()
        };
        let tagged: Vec<&Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| ref_name(d).as_deref() == Some(tag))
            .collect();
        if tagged.is_empty() {
            let available: BTreeSet<String> =
                index.manifests().iter().filter_map(ref_name).collect();
            return Err(ImageError::TagNotFound {
                layout: self.layout.to_owned(),
                tag: tag.to_owned(),
                available: available.into_iter().collect(),
            });
        }
        let mut candidates: Vec<Descriptor> = Vec::new();
        for d in tagged {
            match d.media_type() {
                MediaType::ImageIndex => {
                    let bytes = self.read_blob(d, MAX_INDEX_BYTES)?;
                    let nested = ImageIndex::from_reader(&bytes[..])
                        .map_err(|e| self.malformed(format!("index {}", d.digest()), e))?;
                    candidates.extend(
                        nested
                            .manifests()
                            .iter()
                            .filter(|m| is_manifest_type(m.media_type()))
                            .cloned(),
                    );
                }
                mt if is_manifest_type(mt) => candidates.push(d.clone()),
                other => {
                    return Err(ImageError::UnsupportedMediaType {
                        layout: self.layout.to_owned(),
                        digest: d.digest().to_string(),
                        media_type: other.to_string(),
                    })
                }
            }
        }
        if candidates.len() == 1 && candidates[0].platform().is_none() {
            return Ok(candidates.remove(0));
        }
        let arch = oci_spec::image::Arch::default();
        let os = oci_spec::image::Os::Linux;
        let matching = candidates.iter().find(|d| match d.platform() {
            Some(p) => *p.os() == os && *p.architecture() == arch,
            None => true,
        });
        matching
            .cloned()
            .ok_or_else(|| ImageError::NoMatchingPlatform {
                layout: self.layout.to_owned(),
                tag: tag.to_owned(),
                os: os.to_string(),
                arch: arch.to_string(),
            })
    }

    fn blob_path(&self, d: &Descriptor) -> Result<PathBuf, ImageError> {
        let digest = d.digest();
        if *digest.algorithm() != DigestAlgorithm::Sha256 {
            return Err(ImageError::UnsupportedDigest {
                layout: self.layout.to_owned(),
                digest: digest.to_string(),
            });
        }
        // oci-spec has checked the hex part (64 lowercase hex digits): it is
        // safe as a file name.
        Ok(self.layout.join("blobs/sha256").join(digest.digest()))
    }

    fn open_blob(&self, d: &Descriptor) -> Result<fs::File, ImageError> {
        let path = self.blob_path(d)?;
        let file = fs::File::open(&path).map_err(|source| ImageError::MissingBlob {
            layout: self.layout.to_owned(),
            digest: d.digest().to_string(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| ImageError::MissingBlob {
                layout: self.layout.to_owned(),
                digest: d.digest().to_string(),
                source,
            })?
            .len();
        if size != d.size() {
            return Err(ImageError::SizeMismatch {
                layout: self.layout.to_owned(),
                digest: d.digest().to_string(),
                expected: d.size(),
                actual: size,
            });
        }
        Ok(file)
    }

    /// Reads a small blob whole and checks its digest.
    fn read_blob(&self, d: &Descriptor, max: u64) -> Result<Vec<u8>, ImageError> {
        if d.size() > max {
            return Err(self.malformed(
                format!("descriptor {}", d.digest()),
                format!(
                    "{} bytes is more than the {max} allowed for metadata",
                    d.size()
                ),
            ));
        }
        let mut file = self.open_blob(d)?;
        let mut bytes = Vec::with_capacity(d.size() as usize);
        (&mut file)
            .take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| ImageError::MissingBlob {
                layout: self.layout.to_owned(),
                digest: d.digest().to_string(),
                source,
            })?;
        self.check_digest(d, &format!("sha256:{}", hex(&Sha256::digest(&bytes))))?;
        Ok(bytes)
    }

    fn check_digest(&self, d: &Descriptor, actual: &str) -> Result<(), ImageError> {
        let expected = d.digest().to_string();
        if expected != actual {
            return Err(ImageError::DigestMismatch {
                layout: self.layout.to_owned(),
                expected,
                actual: actual.to_owned(),
            });
        }
        Ok(())
    }

    fn compression(&self, d: &Descriptor) -> Result<Compression, ImageError> {
        Ok(match d.media_type() {
            MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Compression::None,
            MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
                Compression::Gzip
            }
            MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => {
                Compression::Zstd
            }
            MediaType::Other(s)
                if s == "application/vnd.docker.image.rootfs.diff.tar.gzip"
                    || s == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" =>
            {
                Compression::Gzip
            }
            other => {
                return Err(ImageError::UnsupportedMediaType {
                    layout: self.layout.to_owned(),
                    digest: d.digest().to_string(),
                    media_type: other.to_string(),
                })
            }
        })
    }

    fn unpack(
        &self,
        manifest: &ImageManifest,
        manifest_digest: &str,
        oci_dir: &Path,
        entry: &Path,
    ) -> Result<(), ImageError> {
        let cache_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::Cache { path, source }
        };
        // Check every media type before doing any work.
        let compressions = manifest
            .layers()
            .iter()
            .map(|l| self.compression(l))
            .collect::<Result<Vec<_>, _>>()?;
        let config_desc = manifest.config();
        let config_bytes = self.read_blob(config_desc, MAX_CONFIG_BYTES)?;
        let config = ImageConfiguration::from_reader(&config_bytes[..])
            .map_err(|e| self.malformed(format!("config {}", config_desc.digest()), e))?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(self.malformed(
                format!("config {}", config_desc.digest()),
                format!(
                    "{} diff_ids for {} layers",
                    diff_ids.len(),
                    manifest.layers().len()
                ),
            ));
        }

        fs::create_dir_all(oci_dir).map_err(cache_err(oci_dir))?;
        remove_stale_temps(oci_dir);
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".tmp-{}-", std::process::id()))
            .tempdir_in(oci_dir)
            .map_err(cache_err(oci_dir))?;
        let rootfs = tmp.path().join("rootfs");
        fs::create_dir(&rootfs).map_err(cache_err(&rootfs))?;
        fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755))
            .map_err(cache_err(&rootfs))?;

        for ((layer, compression), diff_id) in
            manifest.layers().iter().zip(compressions).zip(diff_ids)
        {
            let started = Instant::now();
            self.apply_layer(layer, compression, diff_id, &rootfs)?;
            tracing::debug!(layer = %layer.digest(), ms = started.elapsed().as_millis() as u64, "layer applied");
        }

        let marker = Marker {
            unpacker: UNPACK_VERSION,
            manifest: manifest_digest.to_owned(),
            layers: manifest
                .layers()
                .iter()
                .map(|l| l.digest().to_string())
                .collect(),
            // Read back from the page cache: about 0.3 s per 150 MB, far less
            // than syncing the unpacked tree (measured 17 s more on a busy
            // host, as syncfs also waits for everyone else's dirty data).
            tree: digest::tree_digest(&rootfs)?,
            boot_id: boot_id(),
        };
        let marker_path = tmp.path().join(MARKER);
        let marker_json = serde_json::to_vec_pretty(&marker).map_err(|e| ImageError::Cache {
            path: marker_path.clone(),
            source: io::Error::other(e),
        })?;
        fs::write(&marker_path, marker_json).map_err(cache_err(&marker_path))?;

        // An unusable entry (older unpacker, failed check) is moved aside,
        // then replaced.
        if entry.exists() {
            let old = tempfile::Builder::new()
                .prefix(&format!(".tmp-{}-old-", std::process::id()))
                .tempdir_in(oci_dir)
                .map_err(cache_err(oci_dir))?;
            let aside = old.path().join("entry");
            fs::rename(entry, &aside).map_err(cache_err(entry))?;
            drop(old);
        }
        // The rename publishes a complete entry: a crashed process leaves
        // only a `.tmp-<pid>-*` folder, removed later. Nothing is fsynced (a
        // power loss is caught by the tree check after the next boot).
        let tmp_path = tmp.keep();
        match fs::rename(&tmp_path, entry) {
            Ok(()) => Ok(()),
            // Another resolver finished first: its entry is as good as ours.
            Err(_) if matches!(cache_state(entry), CacheState::Ready) => {
                let _ = fs::remove_dir_all(&tmp_path);
                Ok(())
            }
            Err(source) => {
                let _ = fs::remove_dir_all(&tmp_path);
                Err(ImageError::Cache {
                    path: entry.to_owned(),
                    source,
                })
            }
        }
    }

    fn apply_layer(
        &self,
        layer: &Descriptor,
        compression: Compression,
        diff_id: &str,
        rootfs: &Path,
    ) -> Result<(), ImageError> {
        let layer_digest = layer.digest().to_string();
        let read_err = |source: io::Error| ImageError::Unpack {
            layout: self.layout.to_owned(),
            layer: layer_digest.clone(),
            path: String::new(),
            source,
        };
        let file = self.open_blob(layer)?;
        let mut blob_hash = Sha256::new();
        let mut diff_hash = Sha256::new();
        let mut raw = BufReader::with_capacity(
            256 * 1024,
            HashRead {
                inner: file,
                hash: &mut blob_hash,
            },
        );
        let unpacked = (|| -> Result<(), ImageError> {
            let decoded: Box<dyn Read + '_> = match compression {
                Compression::None => Box::new(&mut raw),
                Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(&mut raw)),
                Compression::Zstd => {
                    Box::new(zstd::stream::read::Decoder::with_buffer(&mut raw).map_err(read_err)?)
                }
            };
            let mut tar_stream = HashRead {
                inner: decoded,
                hash: &mut diff_hash,
            };
            let mut unpacker = Unpacker {
                oci: self,
                layer: &layer_digest,
                rootfs,
                is_root: nix::unistd::geteuid().is_root(),
                layer_paths: HashSet::new(),
                deferred_dirs: Vec::new(),
            };
            {
                let mut archive = tar::Archive::new(PadToBlock {
                    inner: &mut tar_stream,
                    total: 0,
                    padded: false,
                });
                let entries = archive.entries().map_err(read_err)?;
                for entry in entries {
                    let entry = entry.map_err(read_err)?;
                    unpacker.apply(entry)?;
                }
            }
            unpacker.finish()?;
            // The diff_id covers the whole tar stream, padding included.
            io::copy(&mut tar_stream, &mut io::sink()).map_err(read_err)?;
            Ok(())
        })();
        // Hash the rest of the blob whatever happened: a corrupt blob is
        // reported as such, not as the decoding error it may have caused.
        let drained = io::copy(&mut raw, &mut io::sink());
        drop(raw);
        let blob_digest = format!("sha256:{}", hex(&blob_hash.finalize()));
        if drained.is_ok() {
            self.check_digest(layer, &blob_digest)?;
        }
        unpacked?;
        drained.map_err(read_err)?;
        // A blob that is corrupt but unpacked fine was caught above too: the
        // whole temporary folder is then discarded.
        let actual = format!("sha256:{}", hex(&diff_hash.finalize()));
        if actual != diff_id {
            return Err(ImageError::DiffIdMismatch {
                layout: self.layout.to_owned(),
                layer: layer_digest,
                expected: diff_id.to_owned(),
                actual,
            });
        }
        Ok(())
    }
}

fn is_manifest_type(mt: &MediaType) -> bool {
    match mt {
        MediaType::ImageManifest => true,
        MediaType::Other(s) => s == "application/vnd.docker.distribution.manifest.v2+json",
        _ => false,
    }
}

/// This boot's id; empty if unknown (then every use re-checks).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn cache_state(entry: &Path) -> CacheState {
    let Ok(bytes) = fs::read(entry.join(MARKER)) else {
        return CacheState::Missing;
    };
    match serde_json::from_slice::<Marker>(&bytes) {
        Ok(m) if m.unpacker == UNPACK_VERSION && entry.join("rootfs").is_dir() => {
            if !m.boot_id.is_empty() && m.boot_id == boot_id() {
                CacheState::Ready
            } else {
                CacheState::Unverified(m)
            }
        }
        _ => CacheState::Missing,
    }
}

/// Re-digests an entry written before this boot; if intact, marks it good
/// for this boot. Called with the entry's lock held.
fn verify_after_reboot(entry: &Path, mut marker: Marker) -> bool {
    let rootfs = entry.join("rootfs");
    match digest::tree_digest(&rootfs) {
        Ok(d) if d == marker.tree => {
            marker.boot_id = boot_id();
            let write = || -> io::Result<()> {
                let mut tmp = tempfile::NamedTempFile::new_in(entry)?;
                serde_json::to_writer_pretty(&mut tmp, &marker).map_err(io::Error::other)?;
                tmp.persist(entry.join(MARKER)).map_err(|e| e.error)?;
                Ok(())
            };
            if let Err(e) = write() {
                tracing::warn!(entry = %entry.display(), error = %e, "cannot update the image cache marker");
            }
            true
        }
        Ok(d) => {
            tracing::warn!(entry = %entry.display(), expected = %marker.tree, actual = %d, "unpacked image changed since it was unpacked; unpacking again");
            false
        }
        Err(e) => {
            tracing::warn!(entry = %entry.display(), error = %e, "cannot check unpacked image; unpacking again");
            false
        }
    }
}

/// Removes `.tmp-<pid>-*` folders whose process is gone (a crash mid-unpack).
fn remove_stale_temps(oci_dir: &Path) {
    let Ok(dir) = fs::read_dir(oci_dir) else {
        return;
    };
    for item in dir.flatten() {
        let name = item.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".tmp-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            .map(|()| true)
            .unwrap_or_else(|e| e != nix::errno::Errno::ESRCH);
        if !alive {
            tracing::info!(path = %item.path().display(), "removing a half-unpacked image left by a dead process");
            let _ = fs::remove_dir_all(item.path());
        }
    }
}

fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A reader that hashes what passes through it.
struct HashRead<'h, R> {
    inner: R,
    hash: &'h mut Sha256,
}

impl<R: Read> Read for HashRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for HashRead<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        if let Ok(buf) = self.inner.fill_buf() {
            let n = amt.min(buf.len());
            self.hash.update(&buf[..n]);
        }
        self.inner.consume(amt)
    }
}

/// Completes a tar stream that ends without the padding of its last block.
/// umoci 0.4.7 (Debian 12) writes such layers: it never closes its tar
/// writer, so the last file's data is not padded to 512 bytes and the two
/// end-of-archive blocks are missing; GNU tar and the tar crate both stop at
/// it. Filling the last block with zeros makes it a well-formed archive; the
/// digests are computed on the stream as published, before this.
struct PadToBlock<R> {
    inner: R,
    total: u64,
    padded: bool,
}

impl<R: Read> Read for PadToBlock<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = if self.padded {
            0
        } else {
            self.inner.read(buf)?
        };
        if n > 0 {
            self.total += n as u64;
            return Ok(n);
        }
        let missing = ((512 - self.total % 512) % 512) as usize;
        if missing == 0 {
            return Ok(0);
        }
        if !self.padded {
            tracing::warn!("layer's tar stream ends inside a block; padding it with zeros");
            self.padded = true;
        }
        let k = missing.min(buf.len());
        buf[..k].fill(0);
        self.total += k as u64;
        Ok(k)
    }
}

/// A layer's path made relative to the rootfs; `..` anywhere is rejected.
/// A leading `/` means the rootfs root (umoci writes `/` for it, and GNU tar
/// strips it too): it is never a host path.
fn safe_relative(raw: &[u8]) -> Result<PathBuf, &'static str> {
    let path = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::Prefix(_) => return Err("path prefix"),
            Component::ParentDir => return Err("'..' component"),
        }
    }
    Ok(out)
}

struct Unpacker<'a> {
    oci: &'a Oci<'a>,
    layer: &'a str,
    rootfs: &'a Path,
    is_root: bool,
    /// Entries this layer created: an opaque whiteout keeps them.
    layer_paths: HashSet<PathBuf>,
    /// Directory modes and mtimes are set after the layer (children change
    /// a directory's mtime; a read-only mode would stop children).
    deferred_dirs: Vec<(PathBuf, u32, u64)>,
}

impl Unpacker<'_> {
    fn unsafe_path(&self, path: &[u8], reason: &'static str) -> ImageError {
        ImageError::UnsafePath {
            layout: self.oci.layout.to_owned(),
            layer: self.layer.to_owned(),
            path: String::from_utf8_lossy(path).into_owned(),
            reason,
        }
    }

    fn io_err(&self, rel: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
        let path = rel.display().to_string();
        move |source| ImageError::Unpack {
            layout: self.oci.layout.to_owned(),
            layer: self.layer.to_owned(),
            path,
            source,
        }
    }

    /// Makes sure every parent of `rel` is a real directory (created 0755 if
    /// missing, never a symlink). With `create = false`, returns false if one
    /// is missing.
    fn ensure_parents(&self, raw: &[u8], rel: &Path, create: bool) -> Result<bool, ImageError> {
        let mut cur = self.rootfs.to_owned();
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        for part in parent.components() {
            cur.push(part);
            match fs::symlink_metadata(&cur) {
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(self.unsafe_path(raw, "a parent folder is a symlink"))
                }
                Ok(md) if md.is_dir() => {}
                Ok(_) => return Err(self.unsafe_path(raw, "a parent is not a folder")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    fs::create_dir(&cur).map_err(self.io_err(rel))?;
                    fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                        .map_err(self.io_err(rel))?;
                }
                Err(e) => return Err(self.io_err(rel)(e)),
            }
        }
        Ok(true)
    }

    fn remove_existing(&self, rel: &Path, keep_dir: bool) -> Result<(), ImageError> {
        let abs = self.rootfs.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(md) if md.is_dir() => {
                if !keep_dir {
                    fs::remove_dir_all(&abs).map_err(self.io_err(rel))?;
                }
            }
            Ok(_) => fs::remove_file(&abs).map_err(self.io_err(rel))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io_err(rel)(e)),
        }
        Ok(())
    }

    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let rel = safe_relative(&raw).map_err(|reason| self.unsafe_path(&raw, reason))?;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);

        if rel.as_os_str().is_empty() {
            // The layer's own root ("./"): only its mode and owner matter.
            if kind.is_dir() {
                self.chown(&rel, uid, gid)?;
                self.deferred_dirs.push((rel, mode, mtime));
            }
            return Ok(());
        }
        let name = rel
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            return self.whiteout(&raw, &rel, hidden);
        }

        self.ensure_parents(&raw, &rel, true)?;
        let abs = self.rootfs.join(&rel);
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                self.remove_existing(&rel, true)?;
                if !abs.is_dir() {
                    fs::create_dir(&abs).map_err(self.io_err(&rel))?;
                }
                self.chown(&rel, uid, gid)?;
                self.deferred_dirs.push((rel.clone(), mode, mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.remove_existing(&rel, false)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                    .open(&abs)
                    .map_err(self.io_err(&rel))?;
                io::copy(&mut entry, &mut file).map_err(self.io_err(&rel))?;
                drop(file);
                self.chown(&rel, uid, gid)?;
                self.chmod(&rel, mode)?;
                self.set_mtime(&rel, mtime)?;
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_path(&raw, "symlink without a target"))?
                    .into_owned();
                self.remove_existing(&rel, false)?;
                // A symlink may point anywhere: it is never followed here,
                // and inside the sandbox it resolves within the rootfs.
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &abs)
                    .map_err(self.io_err(&rel))?;
                self.chown(&rel, uid, gid)?;
                self.set_mtime(&rel, mtime)?;
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_path(&raw, "hard link without a target"))?
                    .into_owned();
                let target_rel =
                    safe_relative(&target).map_err(|reason| self.unsafe_path(&target, reason))?;
                if target_rel.as_os_str().is_empty()
                    || !self.ensure_parents(&target, &target_rel, false)?
                {
                    return Err(self.unsafe_path(&target, "hard link target does not exist"));
                }
                self.remove_existing(&rel, false)?;
                // linkat without AT_SYMLINK_FOLLOW: links a symlink itself.
                fs::hard_link(self.rootfs.join(&target_rel), &abs).map_err(self.io_err(&rel))?;
            }
            T::Char | T::Block | T::Fifo => {
                use nix::sys::stat::{makedev, mknod, Mode, SFlag};
                self.remove_existing(&rel, false)?;
                let sflag = match kind {
                    T::Char => SFlag::S_IFCHR,
                    T::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                mknod(
                    &abs,
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    makedev(major as u64, minor as u64),
                )
                .map_err(|e| self.io_err(&rel)(e.into()))?;
                self.chown(&rel, uid, gid)?;
                self.chmod(&rel, mode)?;
                self.set_mtime(&rel, mtime)?;
            }
            other => {
                tracing::debug!(path = %rel.display(), kind = ?other, "skipping tar entry type");
                return Ok(());
            }
        }
        self.layer_paths.insert(rel);
        Ok(())
    }

    fn whiteout(&mut self, raw: &[u8], rel: &Path, hidden: &[u8]) -> Result<(), ImageError> {
        let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
        if hidden == b".wh..opq" {
            // Opaque folder: hide everything lower layers put in it.
            if !self.ensure_parents(raw, rel, true)? {
                return Ok(());
            }
            let abs = self.rootfs.join(&parent);
            if fs::symlink_metadata(&abs)
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                self.clear_lower(&parent)?;
            }
            return Ok(());
        }
        if hidden.starts_with(b".wh.") {
            // Other `.wh..wh.*` names are aufs bookkeeping, not content.
            return Ok(());
        }
        if hidden.is_empty() {
            return Err(self.unsafe_path(raw, "empty whiteout name"));
        }
        if !self.ensure_parents(raw, rel, false)? {
            return Ok(());
        }
        let target = parent.join(std::ffi::OsStr::from_bytes(hidden));
        self.remove_existing(&target, false)
    }

    /// Removes what lower layers left under `dir`, keeping this layer's own
    /// entries.
    fn clear_lower(&self, dir: &Path) -> Result<(), ImageError> {
        let abs = self.rootfs.join(dir);
        let items = fs::read_dir(&abs).map_err(self.io_err(dir))?;
        for item in items {
            let item = item.map_err(self.io_err(dir))?;
            let rel = dir.join(item.file_name());
            if self.layer_paths.contains(&rel) {
                if item.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    self.clear_lower(&rel)?;
                }
            } else {
                self.remove_existing(&rel, false)?;
            }
        }
        Ok(())
    }

    fn chown(&self, rel: &Path, uid: u64, gid: u64) -> Result<(), ImageError> {
        if !self.is_root {
            return Ok(());
        }
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(self.io_err(rel)(io::Error::other("owner id out of range")));
        };
        std::os::unix::fs::lchown(self.rootfs.join(rel), Some(uid), Some(gid))
            .map_err(self.io_err(rel))
    }

    fn chmod(&self, rel: &Path, mode: u32) -> Result<(), ImageError> {
        fs::set_permissions(self.rootfs.join(rel), fs::Permissions::from_mode(mode))
            .map_err(self.io_err(rel))
    }

    fn set_mtime(&self, rel: &Path, mtime: u64) -> Result<(), ImageError> {
        use nix::sys::stat::{utimensat, UtimensatFlags};
        use nix::sys::time::TimeSpec;
        let t = TimeSpec::new(i64::try_from(mtime).unwrap_or(0), 0);
        utimensat(
            None,
            &self.rootfs.join(rel),
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| self.io_err(rel)(e.into()))
    }

    fn finish(&mut self) -> Result<(), ImageError> {
        // Deepest first, so setting a parent's mtime is the last touch on it.
        let mut dirs = std::mem::take(&mut self.deferred_dirs);
        dirs.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
        for (rel, mode, mtime) in dirs {
            let abs = self.rootfs.join(&rel);
            // A later entry of the same layer may have replaced the folder.
            if !fs::symlink_metadata(&abs)
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                continue;
            }
            self.chmod(&rel, mode)?;
            self.set_mtime(&rel, mtime)?;
        }
        Ok(())
    }
}
