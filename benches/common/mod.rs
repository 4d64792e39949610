//! What the benchmarks share: CPU times from /proc, the machine's description, option values.

use embed_url_operator::validation::parse_duration;
use std::time::Duration;

unsafe extern "C" {
    fn sysconf(name: i32) -> i64;
}

/// Clock ticks per second of /proc's utime and stime.
fn ticks_per_second() -> f64 {
    const SC_CLK_TCK: i32 = 2;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { sysconf(SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime and the thread name of a /proc stat file.
pub fn stat_cpu(path: &str) -> Option<(String, Duration)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((
        name,
        Duration::from_secs_f64(ticks as f64 / ticks_per_second()),
    ))
}

pub fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or(format!("{text:?} is not a duration such as 20s or 50ms"))
}

pub fn number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a number"))
}

/// The parsed options, or `None` after printing the help (asked for, or after an error, with
/// exit status 2).
pub fn options_or_help<T>(parsed: Result<T, String>, help: &str) -> Option<T> {
    match parsed {
        Ok(options) => Some(options),
        Err(error) if error.is_empty() => {
            print!("{help}");
            None
        }
        Err(error) => {
            eprintln!("{error}\n\n{help}");
            std::process::exit(2);
        }
    }
}

/// One line on the machine: cores, CPU model, memory, rustc and the load average.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_string(), |m| m.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "machine: {} cores ({model}), {memory:.1} GiB RAM, {rustc}, load average at start {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}
