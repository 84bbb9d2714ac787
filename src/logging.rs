//! Logs as Istio prints them, so that `kubectl logs` of the init container reads the same.
//!
//! Istio's `pkg/log` (zap) writes, per line, either the console form
//! `2026-11-26T23:50:00.123456Z<TAB>info<TAB>message<TAB>key=value key=value` (UTC,
//! microseconds, lowercase level, the fields after the message) or, with `--log_as_json`, one
//! JSON object `{"level":"info","time":"...","msg":"...","key":value}`. This module is a
//! `tracing` layer that writes those two forms, and the parser of Istio's logging flags.

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber, span};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

use crate::cli::Cli;
use crate::config::parse_go_bool;

/// Istio's scope for this tool's own messages.
const DEFAULT_SCOPE: &str = "default";

/// Where one log line goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    Stderr,
    File(PathBuf),
}

impl Target {
    fn parse(s: &str) -> Target {
        match s {
            "stdout" => Target::Stdout,
            "stderr" => Target::Stderr,
            path => Target::File(PathBuf::from(path)),
        }
    }
}

/// What Istio's logging flags (and our `-v`) ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The `default` scope's level.
    pub level: LevelFilter,
    /// `--log_as_json`.
    pub json: bool,
    /// `--log_caller` names the default scope.
    pub caller: bool,
    /// `--log_target`, when given; otherwise `Settings::default_target` decides.
    pub targets: Vec<Target>,
    /// Without `--log_target`: true when stdout carries the command's own output (dry-run
    /// script, explain, verify), so every log line goes to stderr.
    pub stdout_is_output: bool,
    /// Problems with the flags themselves: logged as warnings once logging is up (Istio's
    /// logging flags are never a reason to fail the run).
    pub warnings: Vec<String>,
}

/// Istio's level names (`pkg/log`); `fatal` logs errors here, `none` nothing.
fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s {
        "debug" => LevelFilter::DEBUG,
        "info" => LevelFilter::INFO,
        "warn" => LevelFilter::WARN,
        "error" | "fatal" => LevelFilter::ERROR,
        "none" => LevelFilter::OFF,
        _ => return None,
    })
}

impl Settings {
    /// Reads the logging flags. `stdout_is_output`: the command prints its result on stdout.
    pub fn from_cli(cli: &Cli, stdout_is_output: bool) -> Settings {
        let mut warnings = Vec::new();
        let mut level = LevelFilter::INFO;
        for item in cli.log_output_level.split(',').filter(|i| !i.is_empty()) {
            let (scope, name) = match item.split_once(':') {
                Some((scope, name)) => (scope, name),
                None => (DEFAULT_SCOPE, item),
            };
            match parse_level(name) {
                // Other scopes belong to Istio's components; accepted, nothing of ours is there.
                Some(l) if scope == DEFAULT_SCOPE => level = l,
                Some(_) => {}
                None => warnings.push(format!(
                    "--log_output_level: invalid output level '{name}' in {item:?} \
                     (use debug, info, warn, error, fatal or none); keeping {level}"
                )),
            }
        }
        level = match cli.verbose {
            0 => level,
            1 => level.max(LevelFilter::DEBUG),
            _ => LevelFilter::TRACE,
        };
        let json = parse_go_bool(&cli.log_as_json).unwrap_or_else(|| {
            warnings.push(format!(
                "--log_as_json: {:?} is not a boolean; logging as text",
                cli.log_as_json
            ));
            false
        });
        let caller = cli.log_caller.split(',').any(|s| s.trim() == DEFAULT_SCOPE);
        Settings {
            level,
            json,
            caller,
            targets: cli.log_target.iter().map(|t| Target::parse(t)).collect(),
            stdout_is_output,
            warnings,
        }
    }

    /// Where a line of `level` goes when no `--log_target` was given: stdout as in Istio,
    /// but warnings and errors on stderr (a shell user sees them apart; `kubectl logs`
    /// shows both streams), and everything on stderr when stdout is the command's output.
    fn default_target(&self, level: Level) -> Target {
        if self.stdout_is_output || level <= Level::WARN {
            Target::Stderr
        } else {
            Target::Stdout
        }
    }
}

/// Installs the logger. `RUST_LOG`, when set, replaces the level with its filter syntax.
pub fn init(settings: Settings) {
    let level = settings.level;
    let warnings = settings.warnings.clone();
    let (layer, unopened) = IstioLayer::new(settings);
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => Registry::default()
            .with(layer.with_filter(EnvFilter::new(spec)))
            .init(),
        _ => {
            let _ = tracing::subscriber::set_global_default(Plain { layer, level });
        }
    }
    for w in warnings {
        tracing::warn!("{w}");
    }
    for (path, error) in unopened {
        tracing::warn!(
            "--log_target {}: cannot open it ({error}): its lines go to stderr instead",
            path.display()
        );
    }
}

/// The `tracing` layer writing Istio's line formats.
struct IstioLayer {
    settings: Settings,
    /// `--log_target` files, opened once (None: could not be opened; stderr instead).
    files: Vec<(PathBuf, Option<Mutex<File>>)>,
}

impl IstioLayer {
    /// The layer, and each `--log_target` file that could not be opened, with why (its
    /// lines go to stderr; said once logging is up).
    fn new(settings: Settings) -> (IstioLayer, Vec<(PathBuf, std::io::Error)>) {
        let mut unopened = Vec::new();
        let files = settings
            .targets
            .iter()
            .filter_map(|t| match t {
                Target::File(p) => {
                    let file = File::options().create(true).append(true).open(p);
                    let file = file.map_err(|e| unopened.push((p.clone(), e))).ok();
                    Some((p.clone(), file.map(Mutex::new)))
                }
                _ => None,
            })
            .collect();
        (IstioLayer { settings, files }, unopened)
    }

    fn write_to(&self, target: &Target, line: &[u8]) {
        // A log line that cannot be written is dropped: logging never fails the run.
        let _ = match target {
            Target::Stdout => std::io::stdout().lock().write_all(line),
            Target::Stderr => std::io::stderr().lock().write_all(line),
            Target::File(p) => match self.files.iter().find(|(fp, _)| fp == p) {
                Some((_, Some(f))) => f.lock().map_or(Ok(()), |mut f| f.write_all(line)),
                _ => std::io::stderr().lock().write_all(line),
            },
        };
    }
}

/// The subscriber of a run without `RUST_LOG`: the level and [`IstioLayer`], without
/// `tracing-subscriber`'s span registry, whose set-up (a slab per thread slot) was a
/// measurable part of every pod start. Nothing here opens spans.
struct Plain {
    layer: IstioLayer,
    level: LevelFilter,
}

impl Subscriber for Plain {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.enabled(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        *meta.level() <= self.level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.level)
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        self.layer.write_event(event);
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

impl<S: Subscriber> Layer<S> for IstioLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        self.write_event(event);
    }
}

impl IstioLayer {
    /// Writes one event in Istio's form to its targets.
    fn write_event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let caller = self.settings.caller.then(|| {
            format!(
                "{}:{}",
                meta.file().unwrap_or("?"),
                meta.line().unwrap_or(0)
            )
        });
        let line = Line {
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            level: level_name(*meta.level()),
            caller,
            fields,
        };
        let text = if self.settings.json {
            line.json()
        } else {
            line.console()
        };
        if self.settings.targets.is_empty() {
            self.write_to(
                &self.settings.default_target(*meta.level()),
                text.as_bytes(),
            );
        } else {
            for t in &self.settings.targets {
                self.write_to(t, text.as_bytes());
            }
        }
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// A field's value, typed for JSON.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    /// Already in JSON's form (a number or a boolean).
    Raw(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Text(s) | Value::Raw(s) => f.write_str(s),
        }
    }
}

/// The message and the other fields of one event, in the order given.
#[derive(Debug, Default)]
struct Fields {
    msg: String,
    kv: Vec<(&'static str, Value)>,
}

impl Fields {
    fn push(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.msg = value.to_string();
        } else {
            self.kv.push((field.name(), value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, Value::Text(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, Value::Text(format!("{value:?}")));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Value::Raw(value.to_string()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Value::Raw(value.to_string()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Value::Raw(value.to_string()));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = if value.is_finite() {
            Value::Raw(value.to_string())
        } else {
            Value::Text(value.to_string())
        };
        self.push(field, v);
    }
}

/// One rendered event.
struct Line {
    time: String,
    level: &'static str,
    caller: Option<String>,
    fields: Fields,
}

impl Line {
    /// `time<TAB>level<TAB>[caller<TAB>]msg[<TAB>k=v k=v]`, as zap's console encoder with
    /// Istio's labels writes it.
    fn console(&self) -> String {
        let mut s = format!("{}\t{}\t", self.time, self.level);
        if let Some(c) = &self.caller {
            s.push_str(c);
            s.push('\t');
        }
        s.push_str(&self.fields.msg);
        for (i, (k, v)) in self.fields.kv.iter().enumerate() {
            s.push(if i == 0 { '\t' } else { ' ' });
            let _ = write!(s, "{k}={v}");
        }
        s.push('\n');
        s
    }

    /// `{"level":..,"time":..,["caller":..,]"msg":..,fields...}` in zap's key order.
    fn json(&self) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let mut s = format!("{{\"level\":{},\"time\":{}", q(self.level), q(&self.time));
        if let Some(c) = &self.caller {
            let _ = write!(s, ",\"caller\":{}", q(c));
        }
        let _ = write!(s, ",\"msg\":{}", q(&self.fields.msg));
        for (k, v) in &self.fields.kv {
            let v = match v {
                Value::Text(t) => q(t),
                Value::Raw(r) => r.clone(),
            };
            let _ = write!(s, ",{}:{v}", q(k));
        }
        s.push_str("}\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Args;

    fn settings(argv: &[&str]) -> Settings {
        let mut full = vec!["istio-iptables"];
        full.extend(argv);
        Settings::from_cli(&Args::parse_from(full).unwrap().cli, false)
    }

    #[test]
    fn output_level_takes_istio_forms() {
        assert_eq!(settings(&[]).level, LevelFilter::INFO);
        assert_eq!(
            settings(&["--log_output_level=misc:error,default:debug"]).level,
            LevelFilter::DEBUG
        );
        assert_eq!(
            settings(&["--log_output_level", "warn"]).level,
            LevelFilter::WARN
        );
        assert_eq!(
            settings(&["--log_output_level=default:none"]).level,
            LevelFilter::OFF
        );
        let s = settings(&["--log_output_level=default:loud"]);
        assert_eq!(s.level, LevelFilter::INFO);
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("loud"));
        assert_eq!(
            settings(&["--log_output_level=default:warn", "-v"]).level,
            LevelFilter::DEBUG
        );
    }

    #[test]
    fn targets_and_defaults() {
        let s = settings(&["--log_target", "stderr", "--log_target=/tmp/x.log"]);
        assert_eq!(
            s.targets,
            [Target::Stderr, Target::File(PathBuf::from("/tmp/x.log"))]
        );
        let d = settings(&[]);
        assert_eq!(d.default_target(Level::INFO), Target::Stdout);
        assert_eq!(d.default_target(Level::ERROR), Target::Stderr);
        let mut out = d.clone();
        out.stdout_is_output = true;
        assert_eq!(out.default_target(Level::INFO), Target::Stderr);
    }

    fn line(kv: Vec<(&'static str, Value)>) -> Line {
        Line {
            time: "2026-11-26T23:50:00.123456Z".into(),
            level: "info",
            caller: None,
            fields: Fields {
                msg: "a \"quoted\"\nmessage".into(),
                kv,
            },
        }
    }

    #[test]
    fn console_is_istios() {
        assert_eq!(
            line(vec![]).console(),
            "2026-11-26T23:50:00.123456Z\tinfo\ta \"quoted\"\nmessage\n"
        );
        let l = line(vec![
            ("backend", Value::Text("iptables-nft-restore".into())),
            ("rules", Value::Raw("12".into())),
        ]);
        assert_eq!(
            l.console(),
            "2026-11-26T23:50:00.123456Z\tinfo\ta \"quoted\"\nmessage\tbackend=iptables-nft-restore rules=12\n"
        );
    }

    #[test]
    fn json_is_one_object_with_istios_keys() {
        let l = line(vec![
            ("backend", Value::Text("x\ty".into())),
            ("rules", Value::Raw("12".into())),
            ("ok", Value::Raw("true".into())),
        ]);
        let text = l.json();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["level"], "info");
        assert_eq!(v["time"], "2026-11-26T23:50:00.123456Z");
        assert_eq!(v["msg"], "a \"quoted\"\nmessage");
        assert_eq!(v["backend"], "x\ty");
        assert_eq!(v["rules"], 12);
        assert_eq!(v["ok"], true);
        assert!(text.starts_with("{\"level\":\"info\",\"time\":"));
    }
}
