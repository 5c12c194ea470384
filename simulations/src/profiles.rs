//! Named link profiles. The table lives in `profiles/links.txt` so that the netem scripts of
//! the compose scenarios shape their links with exactly the numbers the simulator models; it
//! is compiled in so the simulator runs from any directory.

use serde::Serialize;

/// The shared table, as shipped.
pub const LINKS_TXT: &str = include_str!("../profiles/links.txt");

/// One side's access link.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LinkProfile {
    pub name: String,
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub loss_pct: f64,
    pub rate_mbit: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("links table line {line}: {reason}")]
    Parse { line: usize, reason: String },
    #[error("no link profile named {0:?}")]
    Unknown(String),
}

/// Parses a `name delay_ms jitter_ms loss_pct rate_mbit` table.
pub fn parse_links(text: &str) -> Result<Vec<LinkProfile>, ProfileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason: String| ProfileError::Parse {
            line: i + 1,
            reason,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, nums @ ..] = fields.as_slice() else {
            continue;
        };
        if nums.len() != 4 {
            return Err(err(format!("expected 5 fields, found {}", fields.len())));
        }
        let mut v = [0.0; 4];
        for (slot, s) in v.iter_mut().zip(nums) {
            *slot = s
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| err(format!("{s:?} is not a non-negative number")))?;
        }
        if v[3] <= 0.0 {
            return Err(err("rate_mbit must be positive".into()));
        }
        out.push(LinkProfile {
            name: (*name).to_string(),
            delay_ms: v[0],
            jitter_ms: v[1],
            loss_pct: v[2],
            rate_mbit: v[3],
        });
    }
    Ok(out)
}

/// Index of the profile called `name`.
pub fn find(profiles: &[LinkProfile], name: &str) -> Result<usize, ProfileError> {
    profiles
        .iter()
        .position(|p| p.name == name)
        .ok_or_else(|| ProfileError::Unknown(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_table_parses_with_the_names_the_scenarios_use() {
        let links = parse_links(LINKS_TXT).unwrap();
        for name in ["lan", "wifi", "lte", "wan-100ms"] {
            assert!(find(&links, name).is_ok(), "{name}");
        }
        assert_eq!(links[find(&links, "wan-100ms").unwrap()].delay_ms, 100.0);
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let e = parse_links("# c\nlan 1 2 3\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(parse_links("x 1 2 -3 4").is_err());
        assert!(parse_links("x 1 2 3 0").is_err());
    }
}
