//! Which instruction set the kernels run on, chosen once at start from what the CPU reports.
//!
//! One binary serves every CPU of a home swarm: it is built for the architecture's baseline and
//! enables AVX-512, AVX2 or NEON code per function at run time. `EDGE_CPU` forces a lower path
//! (for benchmarks and for the tests that prove every path computes the same bits).

use std::fmt;
use std::sync::OnceLock;

/// A kernel path. Every path computes bit-identical results; they differ only in speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust, no target features: the definition the others are tested against.
    Portable,
    /// x86-64 with AVX2, FMA and F16C (Haswell, Zen 1 and later).
    Avx2,
    /// x86-64 with AVX-512 F/BW/VL and VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx512,
    /// aarch64 Advanced SIMD without the dot-product extension (Cortex-A53/A72: Raspberry Pi 3/4).
    Neon,
    /// aarch64 with the dot-product extension (Cortex-A76 and later, Apple Silicon, Pi 5).
    Dotprod,
}

impl Isa {
    /// The name `EDGE_CPU` accepts and logs print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::Dotprod => "dotprod",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        available().contains(&self)
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Isa::Portable,
            Isa::Avx2,
            Isa::Avx512,
            Isa::Neon,
            Isa::Dotprod,
        ]
        .into_iter()
        .find(|i| i.name() == s)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every path this CPU can run, fastest first (detected once).
pub fn available() -> &'static [Isa] {
    static PATHS: OnceLock<Vec<Isa>> = OnceLock::new();
    PATHS.get_or_init(detect)
}

fn detect() -> Vec<Isa> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
            out.push(Isa::Avx512);
        }
        if avx2 {
            out.push(Isa::Avx2);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            out.push(Isa::Dotprod);
        }
        out.push(Isa::Neon);
    }
    out.push(Isa::Portable);
    out
}

/// Feature names the CPU reports that matter to the kernels, for logs and benchmark reports.
pub fn cpu_flags() -> Vec<&'static str> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        macro_rules! check {
            ($($f:tt),*) => {$( if has!($f) { out.push($f); } )*};
        }
        check!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avxvnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        macro_rules! check {
            ($($f:tt),*) => {$( if has!($f) { out.push($f); } )*};
        }
        check!("neon", "fp16", "dotprod", "i8mm", "sve", "sve2");
    }
    out
}

/// The CPU's model name as the OS reports it (Linux), for benchmark reports.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Why the requested path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("EDGE_CPU={0:?} is not a kernel path; this CPU offers {1}")]
    Unknown(String, String),
    #[error("EDGE_CPU={0} asks for a path this CPU cannot run; it offers {1}")]
    Unsupported(Isa, String),
    #[error(
        "this binary was compiled for CPUs with {0} (-C target-cpu/-C target-feature), which \
         this CPU lacks; rebuild without those flags (the kernels choose SIMD paths at run time)"
    )]
    BuiltForNewerCpu(&'static str),
}

fn offered() -> String {
    available()
        .iter()
        .map(|i| i.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Target features the compiler was allowed to assume everywhere; each must exist at run time,
/// or ordinary code (not only the kernels) may execute instructions the CPU does not have.
fn compiled_features_missing() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if cfg!(target_feature = "avx512f") && !has!("avx512f") {
            return Some("AVX-512");
        }
        if cfg!(target_feature = "avx2") && !has!("avx2") {
            return Some("AVX2");
        }
        if cfg!(target_feature = "fma") && !has!("fma") {
            return Some("FMA");
        }
        if cfg!(target_feature = "avx") && !has!("avx") {
            return Some("AVX");
        }
    }
    None
}

fn choose(request: Option<&str>) -> Result<Isa, CpuError> {
    if let Some(missing) = compiled_features_missing() {
        return Err(CpuError::BuiltForNewerCpu(missing));
    }
    let best = available()[0];
    match request.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(best),
        Some(name) => {
            let isa = Isa::parse(&name.to_ascii_lowercase())
                .ok_or_else(|| CpuError::Unknown(name.to_string(), offered()))?;
            if isa.supported() {
                Ok(isa)
            } else {
                Err(CpuError::Unsupported(isa, offered()))
            }
        }
    }
}

static SELECTED: OnceLock<Isa> = OnceLock::new();

/// Chooses the path from the CPU and `EDGE_CPU`, once per process, and logs it. Binaries call
/// this first so that a bad `EDGE_CPU` or a binary built for a newer CPU is a clear error.
pub fn init() -> Result<Isa, CpuError> {
    if let Some(isa) = SELECTED.get() {
        return Ok(*isa);
    }
    let isa = choose(std::env::var("EDGE_CPU").ok().as_deref())?;
    let isa = *SELECTED.get_or_init(|| isa);
    tracing::info!(
        kernels = isa.name(),
        cpu = %cpu_model(),
        flags = %cpu_flags().join(" "),
        "compute kernels selected"
    );
    Ok(isa)
}

/// The path every kernel call uses. A library user that never called [`init`] gets the CPU's
/// best path (or, with an unusable `EDGE_CPU`, the best path and a logged error).
pub fn selected() -> Isa {
    *SELECTED.get_or_init(|| match choose(std::env::var("EDGE_CPU").ok().as_deref()) {
        Ok(isa) => isa,
        Err(e) => {
            tracing::error!("{e}; using the portable kernels");
            Isa::Portable
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_against_the_cpu() {
        assert_eq!(choose(None).unwrap(), available()[0]);
        assert_eq!(choose(Some("portable")).unwrap(), Isa::Portable);
        assert_eq!(choose(Some(" PORTABLE ")).unwrap(), Isa::Portable);
        let err = choose(Some("sse9")).unwrap_err().to_string();
        assert!(err.contains("sse9") && err.contains("portable"), "{err}");
        // A path of the other architecture is never available.
        let foreign = if cfg!(target_arch = "x86_64") {
            "dotprod"
        } else {
            "avx2"
        };
        assert!(matches!(
            choose(Some(foreign)),
            Err(CpuError::Unsupported(..))
        ));
    }
}
