//! `edge-node join --config FILE`: the flags of `join` written in a TOML file.
//!
//! There is no second config struct to keep in step with the flags: each key of the file is
//! looked up among the `join` subcommand's own arguments, turned into command-line arguments,
//! and placed before the real ones, and clap parses the lot. A flag given on the command line
//! replaces the file's value for it (and for flags it conflicts with, so `--num-blocks` on the
//! command line beats `blocks` in the file).

use std::ffi::{OsStr, OsString};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use toml::de::{DeTable, DeValue};

/// The subcommand that reads `--config`.
const SUBCOMMAND: &str = "join";
/// The argument that names the file.
const CONFIG_ARG: &str = "config";
/// Arguments whose relative paths in a file are taken relative to the file's directory.
const PATH_ARGS: [&str; 4] = ["model", "identity", "health_file", "swarm_key"];

/// A mistake in a config file, with the line it is on when known.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct ConfigError {
    pub line: Option<usize>,
    pub message: String,
}

/// One key of the file as command-line arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct FileFlag {
    /// The clap id of the argument it sets.
    pub id: String,
    pub args: Vec<OsString>,
}

/// Parses `argv` like `T::parse_from` (printing help or usage errors and exiting the way clap
/// does), except that for `join --config FILE` the file's flags come first. Errors about the
/// file are returned, one line each, naming the file.
pub fn parse<T: clap::Parser>(argv: Vec<OsString>) -> anyhow::Result<T> {
    let mut cmd = T::command().mut_subcommand(SUBCOMMAND, |c| c.args_override_self(true));
    cmd.build();
    let Some((file, explicit)) = config_request(&cmd, &argv) else {
        let matches = cmd.get_matches_from(argv);
        return Ok(T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()));
    };
    let join = cmd
        .find_subcommand(SUBCOMMAND)
        .ok_or_else(|| anyhow!("no `{SUBCOMMAND}` subcommand"))?;
    let shown = file.display();
    let text = std::fs::read_to_string(&file).map_err(|e| anyhow!("cannot read {shown}: {e}"))?;
    let base = file.parent().unwrap_or(Path::new(""));
    let flags = file_flags(join, &text, base).map_err(|e| anyhow!("{shown}: {e}"))?;
    let from_file: Vec<OsString> = flags
        .into_iter()
        .filter(|f| !overridden(join, &f.id, &explicit))
        .flat_map(|f| f.args)
        .collect();
    // The top level has no options taking values, so the first `join` is the subcommand.
    let at = argv
        .iter()
        .skip(1)
        .position(|a| a == SUBCOMMAND)
        .map_or(argv.len(), |i| i + 2);
    let mut full = argv[..at].to_vec();
    full.extend(from_file);
    full.extend_from_slice(&argv[at..]);
    match cmd.try_get_matches_from(full) {
        Ok(matches) => T::from_arg_matches(&matches).map_err(|e| anyhow!("{}", one_line(&e))),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => Err(anyhow!("{} (with the flags from {shown})", one_line(&e))),
    }
}

/// The config file named on a `join` command line, and the ids of the arguments given there.
fn config_request(cmd: &Command, argv: &[OsString]) -> Option<(PathBuf, Vec<String>)> {
    let lenient = cmd.clone().ignore_errors(true);
    let matches = lenient.try_get_matches_from(argv).ok()?;
    let sub = matches.subcommand_matches(SUBCOMMAND)?;
    let file = sub.try_get_one::<PathBuf>(CONFIG_ARG).ok()??.clone();
    let explicit = explicit_ids(cmd.find_subcommand(SUBCOMMAND)?, sub);
    Some((file, explicit))
}

fn explicit_ids(cmd: &Command, matches: &ArgMatches) -> Vec<String> {
    cmd.get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
        .map(str::to_string)
        .collect()
}

/// Whether the command line sets `id` itself or an argument that conflicts with it.
fn overridden(cmd: &Command, id: &str, explicit: &[String]) -> bool {
    let conflicts = |a: &str, b: &str| {
        cmd.get_arguments()
            .find(|x| x.get_id() == a)
            .is_some_and(|x| {
                cmd.get_arg_conflicts_with(x)
                    .iter()
                    .any(|c| c.get_id() == b)
            })
    };
    explicit
        .iter()
        .any(|e| e == id || conflicts(id, e) || conflicts(e, id))
}

/// The first line of a clap error, without its `error: ` prefix.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Turns the TOML `text` into command-line arguments for `cmd`, in the file's order: strings
/// and numbers become `--key=value`, `true` becomes `--key` (`false` nothing), arrays repeat the
/// flag. Keys may be written `num-blocks` or `num_blocks`. Relative paths of `PATH_ARGS` are
/// joined to `base` (the file's directory). Every value is checked with the flag's own parser.
pub fn file_flags(cmd: &Command, text: &str, base: &Path) -> Result<Vec<FileFlag>, ConfigError> {
    let line_of = |span: Range<usize>| {
        let before = text.get(..span.start).unwrap_or(text);
        Some(before.matches('\n').count() + 1)
    };
    let table = DeTable::parse(text).map_err(|e| ConfigError {
        line: e.span().and_then(line_of),
        message: format!("not valid TOML: {}", e.message()),
    })?;
    let mut entries: Vec<_> = table.get_ref().iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    let mut flags: Vec<FileFlag> = Vec::new();
    for (key, value) in entries {
        let name = key.get_ref().as_ref();
        let err = |message: String| ConfigError {
            line: line_of(key.span()),
            message,
        };
        if name.replace('-', "_") == CONFIG_ARG {
            return Err(err(format!("`{name}` cannot be set inside a config file")));
        }
        if value.get_ref().is_table() {
            return Err(err(format!(
                "`{name}` is a table; write every setting as `key = value` at the top level"
            )));
        }
        let long = name.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && settable(a))
            .ok_or_else(|| {
                err(format!(
                    "unknown key `{name}`: not a flag of `edge-node {}`",
                    cmd.get_name()
                ))
            })?;
        let id = arg.get_id().as_str().to_string();
        if flags.iter().any(|f| f.id == id) {
            return Err(err(format!("`{name}` is set twice")));
        }
        let values = values_of(arg, name, value.get_ref()).map_err(err)?;
        let mut args = Vec::new();
        for v in values {
            match v {
                Scalar::Flag(true) => args.push(OsString::from(format!("--{long}"))),
                Scalar::Flag(false) => {}
                Scalar::Text(mut s) => {
                    if PATH_ARGS.contains(&id.as_str()) && Path::new(&s).is_relative() {
                        s = base.join(&s).to_string_lossy().into_owned();
                    }
                    check_value(arg, &s).map_err(|m| err(format!("`{name}`: {m}")))?;
                    args.push(OsString::from(format!("--{long}={s}")));
                }
            }
        }
        flags.push(FileFlag { id, args });
    }
    Ok(flags)
}

/// Arguments a file can set: options and on/off flags (not `--help`, counters, ...).
fn settable(arg: &Arg) -> bool {
    matches!(
        arg.get_action(),
        ArgAction::Set | ArgAction::Append | ArgAction::SetTrue
    )
}

enum Scalar {
    Flag(bool),
    Text(String),
}

/// The values of one key, checked against the kind of argument it sets.
fn values_of(arg: &Arg, name: &str, value: &DeValue) -> Result<Vec<Scalar>, String> {
    let kind = value.type_str();
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, DeValue::Boolean(b)) => Ok(vec![Scalar::Flag(*b)]),
        (ArgAction::SetTrue, _) => Err(format!("`{name}` must be true or false, not a {kind}")),
        (ArgAction::Append, DeValue::Array(items)) => items
            .iter()
            .map(|item| match text_of(item.get_ref()) {
                Some(s) => Ok(Scalar::Text(s)),
                None => Err(format!(
                    "`{name}` must be a list of strings or numbers, but it holds a {}",
                    item.get_ref().type_str()
                )),
            })
            .collect(),
        (ArgAction::Append, _) => text_of(value)
            .map(|s| vec![Scalar::Text(s)])
            .ok_or_else(|| format!("`{name}` must be a string, a number or a list, not a {kind}")),
        (_, DeValue::Array(_)) => Err(format!("`{name}` takes one value, not a list")),
        _ => text_of(value)
            .map(|s| vec![Scalar::Text(s)])
            .ok_or_else(|| format!("`{name}` must be a string or a number, not a {kind}")),
    }
}

/// Strings, integers and floats as they would be typed on a command line.
fn text_of(value: &DeValue) -> Option<String> {
    match value {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
            .ok()
            .map(|n| n.to_string()),
        DeValue::Float(f) => Some(f.as_str().to_string()),
        _ => None,
    }
}

/// Runs `value` through the argument's own value parser, so a bad value is reported against
/// the file rather than as a command-line error.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let probe = Command::new("probe").no_binary_name(true).arg(
        Arg::new("value")
            .long("value")
            .action(ArgAction::Set)
            .allow_hyphen_values(true)
            .value_parser(arg.get_value_parser().clone()),
    );
    match probe.try_get_matches_from([OsStr::new("--value"), OsStr::new(value)]) {
        Ok(_) => Ok(()),
        Err(e) => {
            let why = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.kind().to_string());
            Err(format!("invalid value `{value}`: {why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Parser, Subcommand};

    use crate::cmd::join::{Blocks, JoinArgs};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Join(JoinArgs),
    }

    fn join_cmd() -> Command {
        let mut cmd = JoinArgs::augment_args(Command::new("join"));
        cmd.build();
        cmd
    }

    fn args(text: &str) -> Result<Vec<String>, ConfigError> {
        let flags = file_flags(&join_cmd(), text, Path::new("/etc/edge-node"))?;
        Ok(flags
            .into_iter()
            .flat_map(|f| f.args)
            .map(|a| a.to_string_lossy().into_owned())
            .collect())
    }

    fn error(text: &str) -> String {
        args(text).expect_err("should fail").to_string()
    }

    #[test]
    fn every_kind_of_value_becomes_flags_in_file_order() {
        let text = r#"
model = "/var/lib/edge-node/model.gguf"
num-blocks = 10
rebalance_min_gain = 0.25
no-mdns = true
no-rebalance = false
bootstrap = ["/ip4/10.0.0.1/tcp/31330", "/ip4/10.0.0.2/tcp/31330"]
listen = "/ip4/0.0.0.0/tcp/4000"
max-memory = "512M"
cache-tokens = 0x100
"#;
        assert_eq!(
            args(text).unwrap(),
            [
                "--model=/var/lib/edge-node/model.gguf",
                "--num-blocks=10",
                "--rebalance-min-gain=0.25",
                "--no-mdns",
                "--bootstrap=/ip4/10.0.0.1/tcp/31330",
                "--bootstrap=/ip4/10.0.0.2/tcp/31330",
                "--listen=/ip4/0.0.0.0/tcp/4000",
                "--max-memory=512M",
                "--cache-tokens=256",
            ]
        );
    }

    #[test]
    fn relative_paths_are_taken_from_the_files_directory() {
        let text =
            "model = \"models/m.gguf\"\nidentity = \"/keys/node.key\"\nhealth_file = \"h\"\n";
        assert_eq!(
            args(text).unwrap(),
            [
                "--model=/etc/edge-node/models/m.gguf",
                "--identity=/keys/node.key",
                "--health-file=/etc/edge-node/h",
            ]
        );
    }

    #[test]
    fn mistakes_name_the_key_and_the_line() {
        assert_eq!(
            error("model = \"m\"\nnum-block = 3\n"),
            "line 2: unknown key `num-block`: not a flag of `edge-node join`"
        );
        assert_eq!(
            error("\n\nconfig = \"other.toml\"\n"),
            "line 3: `config` cannot be set inside a config file"
        );
        assert_eq!(
            error("num-blocks = \"ten\"\n"),
            "line 1: `num-blocks`: invalid value `ten`: invalid digit found in string"
        );
        assert_eq!(
            error("drain-timeout = 100000\n"),
            "line 1: `drain-timeout`: invalid value `100000`: 100000 is not in 0..=86400"
        );
        assert_eq!(
            error("no-mdns = \"yes\"\n"),
            "line 1: `no-mdns` must be true or false, not a string"
        );
        assert_eq!(
            error("max-sessions = true\n"),
            "line 1: `max-sessions` must be a string or a number, not a boolean"
        );
        assert_eq!(
            error("model = [\"a\", \"b\"]\n"),
            "line 1: `model` takes one value, not a list"
        );
        assert_eq!(
            error("bootstrap = [[\"a\"]]\n"),
            "line 1: `bootstrap` must be a list of strings or numbers, but it holds a array"
        );
        assert_eq!(
            error("[join]\nmodel = \"m\"\n"),
            "line 1: `join` is a table; write every setting as `key = value` at the top level"
        );
        assert_eq!(
            error("num_blocks = 1\nnum-blocks = 2\n"),
            "line 2: `num-blocks` is set twice"
        );
        assert_eq!(
            error("blocks = \"5..2\"\n"),
            "line 1: `blocks`: invalid value `5..2`: block range `5..2` is empty"
        );
        assert_eq!(
            error("help = true\n"),
            "line 1: unknown key `help`: not a flag of `edge-node join`"
        );
        let bad = error("model = \"m\"\nthreads = \n");
        assert!(bad.starts_with("line 2: not valid TOML: "), "{bad}");
    }

    /// deploy/edge-node.toml documents every flag of `join`, and every value it shows is valid.
    #[test]
    fn the_example_file_covers_every_flag_with_valid_values() {
        let text = include_str!("../../../deploy/edge-node.toml");
        args(text).unwrap();
        // `#key = value` lines are settings left at their default; all of them must parse too.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let flags = file_flags(&join_cmd(), &uncommented, Path::new("/")).unwrap();
        let documented: Vec<&str> = flags.iter().map(|f| f.id.as_str()).collect();
        for arg in join_cmd().get_arguments().filter(|a| settable(a)) {
            let id = arg.get_id().as_str();
            assert!(
                id == CONFIG_ARG || documented.contains(&id),
                "deploy/edge-node.toml does not show `{}`",
                arg.get_long().unwrap_or(id)
            );
        }
    }

    fn parse_with(file: &str, cli: &[&str]) -> anyhow::Result<JoinArgs> {
        let dir = std::env::temp_dir().join(format!(
            "edge-node-config-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("node.toml");
        std::fs::write(&path, file)?;
        let mut argv: Vec<OsString> = vec!["edge-node".into(), "join".into()];
        argv.push("--config".into());
        argv.push(path.clone().into());
        argv.extend(cli.iter().map(OsString::from));
        let parsed = parse::<Cli>(argv);
        let _ = std::fs::remove_dir_all(&dir);
        let Cmd::Join(args) = parsed?.command;
        Ok(args)
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let file = r#"
model = "/m.gguf"
num-blocks = 5
bootstrap = ["/ip4/10.0.0.1/tcp/1", "/ip4/10.0.0.2/tcp/1"]
max-sessions = 3
"#;
        let a = parse_with(file, &[]).unwrap();
        assert_eq!(a.model, PathBuf::from("/m.gguf"));
        assert_eq!(a.num_blocks, Some(5));
        assert_eq!(a.net.bootstrap.len(), 2);
        assert_eq!(a.compute.max_sessions, 3);

        let a = parse_with(
            file,
            &["--max-sessions", "7", "--bootstrap", "/ip4/10.0.0.3/tcp/1"],
        )
        .unwrap();
        assert_eq!(a.compute.max_sessions, 7);
        let boots: Vec<String> = a.net.bootstrap.iter().map(|m| m.to_string()).collect();
        assert_eq!(boots, ["/ip4/10.0.0.3/tcp/1"]);

        // `--blocks` on the command line conflicts with the file's `num-blocks`: it replaces it.
        let a = parse_with(file, &["--blocks", "0..4"]).unwrap();
        assert!(matches!(a.blocks, Some(Blocks::Range(ref r)) if *r == (0..4)));
        assert_eq!(a.num_blocks, None);
    }

    #[test]
    fn file_errors_name_the_file() {
        let e = parse_with("nope = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("node.toml: line 1: unknown key `nope`"), "{e}");
        // A conflict inside the file is clap's to report, with the file named.
        let e = parse_with("model = \"m\"\nblocks = \"0..3\"\nnum-blocks = 2\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be used with"), "{e}");
        assert!(e.contains("node.toml"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let argv = ["edge-node", "join", "--config", "/nonexistent/x.toml"];
        let e = parse::<Cli>(argv.iter().map(OsString::from).collect())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read /nonexistent/x.toml: "), "{e}");
    }
}
