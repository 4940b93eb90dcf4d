//! `[[environment]]`: where an environment's config comes from (a git
//! branch), how versions reach it (promotion from another environment,
//! soak time, approval) and when (deploy windows).

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::diagnostic::{Problem, ProblemKind};

#[derive(Debug, Clone)]
pub struct Environment {
    pub name: String,
    pub span: Range<usize>,
    /// The environment's config is the `slipway.toml` of this branch.
    pub git: Option<GitSource>,
    /// Versions are promoted from this environment.
    pub promote_from: Option<String>,
    pub promote_from_span: Option<Range<usize>>,
    /// How long a version must have run in `promote_from` first.
    pub soak: Duration,
    /// Deploys wait for an approver (`slipway approve`).
    pub approval: bool,
    /// Deploys start only inside one of these (empty: any time).
    pub windows: Vec<Window>,
    /// The zone `windows` are in (UTC unless `timezone` says otherwise).
    pub timezone: Zone,
}

/// A time zone from the tz database, with the name it was given.
#[derive(Debug, Clone)]
pub struct Zone {
    pub name: String,
    pub tz: jiff::tz::TimeZone,
}

impl Default for Zone {
    fn default() -> Self {
        Zone { name: "UTC".into(), tz: jiff::tz::TimeZone::UTC }
    }
}

impl Zone {
    pub fn get(name: &str) -> Result<Zone, String> {
        jiff::tz::TimeZone::get(name).map(|tz| Zone { name: name.to_string(), tz }).map_err(|e| format!("unknown time zone {name:?}: {e}"))
    }

    fn at(&self, at: i64) -> jiff::ZonedDateTime {
        jiff::Timestamp::from_second(at).unwrap_or(jiff::Timestamp::UNIX_EPOCH).to_zoned_datetime(self.tz.clone())
    }

    /// `at` (ms since the epoch) as "Tue 09:00:00 CET", in this zone.
    pub fn clock(&self, ms: i64) -> String {
        self.at(ms.div_euclid(1000)).strftime("%a %H:%M:%S %Z").to_string()
    }
}

impl Environment {
    pub fn named(name: &str) -> Self {
        Environment {
            name: name.to_string(),
            span: 0..0,
            git: None,
            promote_from: None,
            promote_from_span: None,
            soak: Duration::ZERO,
            approval: false,
            windows: vec![],
            timezone: Zone::default(),
        }
    }

    /// Whether `at` (seconds since the epoch) is inside a deploy window.
    pub fn window_open(&self, at: i64) -> bool {
        self.windows.is_empty() || self.windows.iter().any(|w| w.contains(at, &self.timezone))
    }

    /// When the next window opens after `at` (seconds since the epoch).
    pub fn next_window(&self, at: i64) -> Option<i64> {
        self.windows.iter().filter_map(|w| w.next_open(at, &self.timezone)).min()
    }

    pub fn windows_text(&self) -> String {
        format!("{} {}", self.windows.iter().map(|w| w.text.as_str()).collect::<Vec<_>>().join(", "), self.timezone.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSource {
    /// A local path or a URL `git` understands (never starting with '-').
    pub url: String,
    pub branch: crate::values::Branch,
    /// The directory of the repository holding `slipway.toml` ("" = root).
    pub path: String,
    /// Look for new commits this often (None: only on a push webhook).
    pub poll: Option<Duration>,
    /// Each git command is killed after this.
    pub timeout: Duration,
    /// HTTPS credentials: the user name (default `x-access-token`, what
    /// GitHub and Gitea expect with a token) and a `[secret.*]` holding the
    /// password or token. Sent as an `http.extraHeader` through git's
    /// environment, never on its command line or in the URL.
    pub username: Option<String>,
    pub password: Option<super::secret::SecretRef>,
}

impl GitSource {
    /// The `Authorization` header git sends, when credentials are set.
    pub fn authorization(&self) -> Result<Option<String>, String> {
        use std::io::Write as _;
        let Some(p) = &self.password else { return Ok(None) };
        let secret = p.read()?;
        let user = self.username.as_deref().unwrap_or("x-access-token");
        let mut raw = Vec::new();
        let _ = write!(raw, "{user}:{}", secret.expose());
        Ok(Some(format!("Authorization: Basic {}", base64_encode(&raw))))
    }

    /// The URL for people and logs: a password or token in it is hidden.
    pub fn shown(&self) -> String {
        redact_userinfo(&self.url)
    }
}

/// Standard base64 with padding (one header's worth; no crate for it).
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `https://user:secret@host/…` → `https://user:***@host/…` (and a bare
/// `https://token@host/…` → `https://***@host/…`).
pub fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = match user.split_once(':') {
                Some((name, _)) => format!("{name}:***"),
                None => "***".to_string(),
            };
            format!("{scheme}://{user}@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// A weekly window in the environment's zone: days of the week and a
/// time range of wall-clock time. A range whose end is before its start
/// runs past midnight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Bit 0 = Monday … bit 6 = Sunday: the days the window *opens*.
    pub days: u8,
    /// Minutes after midnight, wall-clock time.
    pub start: u32,
    pub end: u32,
    pub text: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Window {
    /// `"mon-fri 09:00-17:00"`, `"sat,sun 10:00-12:00"`, `"22:00-02:00"`.
    pub fn parse(s: &str) -> Result<Window, String> {
        let s = s.trim();
        let (days_part, time_part) = match s.rsplit_once(' ') {
            Some((d, t)) => (Some(d.trim()), t),
            None => (None, s),
        };
        let days = match days_part {
            None => 0x7f,
            Some(d) => {
                let mut bits = 0u8;
                for item in d.split(',') {
                    let item = item.trim().to_ascii_lowercase();
                    let day = |n: &str| DAYS.iter().position(|d| *d == n).ok_or_else(|| format!("unknown day {n:?} (use mon, tue, wed, thu, fri, sat, sun)"));
                    match item.split_once('-') {
                        Some((a, b)) => {
                            let (a, b) = (day(a)?, day(b)?);
                            let mut i = a;
                            loop {
                                bits |= 1 << i;
                                if i == b {
                                    break;
                                }
                                i = (i + 1) % 7;
                            }
                        }
                        None => bits |= 1 << day(&item)?,
                    }
                }
                bits
            }
        };
        let (a, b) = time_part.split_once('-').ok_or_else(|| format!("{time_part:?} is not a time range like 09:00-17:00"))?;
        let (start, end) = (minutes(a)?, minutes(b)?);
        if start == end {
            return Err("the window starts and ends at the same time".into());
        }
        if start == 24 * 60 {
            return Err("a window cannot start at 24:00 (use 00:00 of the next day)".into());
        }
        Ok(Window { days, start, end, text: s.to_string() })
    }

    /// Whether `at` (seconds since the epoch) is inside, on `zone`'s
    /// wall clock.
    pub fn contains(&self, at: i64, zone: &Zone) -> bool {
        let (day, minute) = day_minute(&zone.at(at));
        if self.start < self.end {
            self.days & (1 << day) != 0 && minute >= self.start && minute < self.end
        } else {
            // Past midnight: opened today in the evening, or yesterday.
            let yesterday = (day + 6) % 7;
            (self.days & (1 << day) != 0 && minute >= self.start) || (self.days & (1 << yesterday) != 0 && minute < self.end)
        }
    }

    /// The next opening strictly after `at` (within two weeks), in
    /// seconds since the epoch. An opening in a daylight-saving gap
    /// (02:30 on the night clocks skip from 02:00 to 03:00) is at the end
    /// of the gap, where [`Window::contains`] starts to say yes.
    pub fn next_open(&self, at: i64, zone: &Zone) -> Option<i64> {
        let open = jiff::civil::Time::new((self.start / 60) as i8, (self.start % 60) as i8, 0, 0).ok()?;
        let mut date = zone.at(at).date();
        for _ in 0..15 {
            let mut t = zone.tz.to_timestamp(date.to_datetime(open)).ok()?.as_second();
            if zone.at(t).time() != open {
                // In a gap: back to the first minute the wall clock shows
                // past the opening time (gaps are at most a few hours).
                for _ in 0..240 {
                    if !self.contains(t - 60, zone) {
                        break;
                    }
                    t -= 60;
                }
            }
            // (A window lying wholly in a gap does not open that day.)
            if t > at && self.days & (1 << date.weekday().to_monday_zero_offset()) != 0 && self.contains(t, zone) {
                return Some(t);
            }
            date = date.tomorrow().ok()?;
        }
        None
    }
}

/// (weekday with Monday = 0, minute of the day) on a wall clock.
fn day_minute(z: &jiff::ZonedDateTime) -> (u32, u32) {
    (z.weekday().to_monday_zero_offset() as u32, z.hour() as u32 * 60 + z.minute() as u32)
}

fn minutes(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a time like 09:00");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// A branch name from config or a payload: a strict alphabet, no `..`, not
/// starting with '-' or '/', so it is safe as one argument and in a refspec.
pub fn valid_branch(b: &str) -> bool {
    crate::values::Branch::parse(b).is_ok()
}

#[derive(Deserialize)]
pub(super) struct RawEnvironment {
    name: Spanned<String>,
    git: Option<Spanned<RawGit>>,
    promote_from: Option<Spanned<String>>,
    soak: Option<Spanned<String>>,
    #[serde(default)]
    approval: bool,
    #[serde(default)]
    windows: Vec<Spanned<String>>,
    timezone: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawGit {
    url: Spanned<String>,
    branch: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    poll: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
}

pub(super) fn build(raw: RawEnvironment, secrets: &std::collections::BTreeMap<String, super::secret::SecretRef>, problems: &mut Vec<Problem>) -> Environment {
    super::check_name(&raw.name, "environment", problems);
    let mut env = Environment::named(raw.name.get_ref());
    env.span = raw.name.span();
    env.git = raw.git.map(|g| {
        let g = g.into_inner();
        let url = g.url.get_ref().trim().to_string();
        if url.is_empty() || url.starts_with('-') || url.chars().any(|c| c.is_control()) || url.starts_with("ext::") {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(g.url.span()), format!("{url:?} is not a repository path or URL"))
                    .label("not a repository")
                    .hint("a local path, https://…, ssh://… or git@host:path"),
            );
        }
        let branch = match &g.branch {
            None => crate::values::Branch::main(),
            Some(b) => crate::values::Branch::parse(b.get_ref()).unwrap_or_else(|_| {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(b.span()), format!("invalid branch name {:?}", b.get_ref()))
                        .label("invalid branch")
                        .hint("letters, digits, '.', '_', '-' and '/', not starting with '-' and without '..'"),
                );
                // Never used: the config is refused with the problem above.
                crate::values::Branch::main()
            }),
        };
        let path = g.path.as_ref().map(|p| p.get_ref().trim_matches('/').to_string()).unwrap_or_default();
        if let Some(p) = &g.path
            && !path.is_empty()
            && (path.split('/').any(|c| c.is_empty() || c == "." || c == "..")
                || !path.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
        {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(p.span()), format!("invalid path {:?} in the repository", p.get_ref()))
                    .label("invalid path")
                    .hint("a relative directory such as \"deploy\" or \"ops/slipway\""),
            );
        }
        GitSource {
            url,
            branch,
            path,
            poll: g.poll.as_ref().and_then(|p| super::duration(p, "git.poll", problems)),
            timeout: g.timeout.as_ref().and_then(|t| super::duration(t, "git.timeout", problems)).unwrap_or(Duration::from_secs(120)),
            username: g.username.as_ref().map(|u| {
                if u.get_ref().is_empty() || u.get_ref().contains(':') || u.get_ref().chars().any(|c| c.is_control()) {
                    problems.push(
                        Problem::new(ProblemKind::InvalidValue, Some(u.span()), "invalid git user name")
                            .label("invalid")
                            .hint("a user name without ':' or control characters"),
                    );
                }
                u.get_ref().clone()
            }),
            password: g.password.as_ref().and_then(|p| super::secret::lookup(p, secrets, problems)),
        }
    });
    if let Some(p) = &raw.promote_from {
        env.promote_from = Some(p.get_ref().clone());
        env.promote_from_span = Some(p.span());
    }
    if let Some(s) = &raw.soak {
        if raw.promote_from.is_none() {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(s.span()), "`soak` without `promote_from`")
                    .label("soak of what?")
                    .hint("soak is how long a version must run in `promote_from` before it is promoted here"),
            );
        }
        env.soak = super::duration(s, "soak", problems).unwrap_or_default();
    }
    env.approval = raw.approval;
    if let Some(tz) = &raw.timezone {
        match Zone::get(tz.get_ref()) {
            Ok(z) => env.timezone = z,
            Err(e) => problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(tz.span()), e)
                    .label("not a time zone")
                    .hint("a name from the tz database, e.g. \"Europe/Berlin\" or \"America/New_York\""),
            ),
        }
    }
    for w in &raw.windows {
        match Window::parse(w.get_ref()) {
            Ok(win) => env.windows.push(win),
            Err(e) => problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(w.span()), format!("invalid deploy window: {e}"))
                    .label("invalid window")
                    .hint("e.g. \"mon-fri 09:00-17:00\" or \"sat 10:00-12:00\" (in the environment's `timezone`, UTC by default)"),
            ),
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23 was a Monday.
    const MONDAY: i64 = 1_795_392_000;

    #[test]
    fn windows_open_on_their_days_and_hours() {
        let utc = Zone::default();
        assert_eq!(day_minute(&utc.at(MONDAY)), (0, 0));
        let w = Window::parse("mon-fri 09:00-17:00").unwrap();
        assert!(w.contains(MONDAY + 9 * 3600, &utc));
        assert!(!w.contains(MONDAY + 17 * 3600, &utc));
        assert!(!w.contains(MONDAY + 5 * 86_400 + 10 * 3600, &utc), "saturday");
        assert_eq!(w.next_open(MONDAY + 17 * 3600, &utc), Some(MONDAY + 86_400 + 9 * 3600));
        assert_eq!(w.next_open(MONDAY + 4 * 86_400 + 18 * 3600, &utc), Some(MONDAY + 7 * 86_400 + 9 * 3600), "friday evening → monday");
        let night = Window::parse("sun 22:00-02:00").unwrap();
        assert!(night.contains(MONDAY - 3600, &utc), "sunday 23:00");
        assert!(night.contains(MONDAY + 3600, &utc), "monday 01:00, opened sunday");
        assert!(!night.contains(MONDAY + 22 * 3600 + 60, &utc), "monday 22:01");
        let sat_sun = Window::parse("sat,sun 10:00-12:00").unwrap();
        assert_eq!(sat_sun.days, 0b110_0000);
        assert!(Window::parse("fri-mon 10:00-11:00").unwrap().contains(MONDAY + 10 * 3600, &utc));
    }

    #[test]
    fn windows_follow_their_time_zone_across_daylight_saving() {
        let berlin = Zone::get("Europe/Berlin").expect("tz database");
        let w = Window::parse("mon-fri 09:00-17:00").unwrap();
        // November: Berlin is UTC+1, so 09:00 there is 08:00 UTC.
        assert!(!w.contains(MONDAY + 7 * 3600 + 59 * 60, &berlin));
        assert!(w.contains(MONDAY + 8 * 3600, &berlin));
        assert!(!w.contains(MONDAY + 16 * 3600, &berlin), "17:00 in Berlin");
        assert_eq!(w.next_open(MONDAY, &berlin), Some(MONDAY + 8 * 3600));
        assert_eq!(berlin.clock((MONDAY + 8 * 3600) * 1000), "Mon 09:00:00 CET");
        // 2026-07-06 was a Monday; in summer Berlin is UTC+2.
        let july = 1_783_296_000;
        assert!(w.contains(july + 7 * 3600, &berlin), "09:00 CEST");
        assert!(!w.contains(july + 15 * 3600, &berlin), "17:00 CEST");
        // Clocks went forward on Sunday 2026-03-29 from 02:00 to 03:00: a
        // window opening at 02:30 that night opens at 03:00 CEST (01:00 UTC).
        let gap = Window::parse("sun 02:30-04:00").unwrap();
        let saturday_noon = 1_774_699_200; // 2026-03-28 12:00 UTC
        assert_eq!(gap.next_open(saturday_noon, &berlin), Some(1_774_746_000));
        assert!(gap.contains(1_774_746_000, &berlin) && !gap.contains(1_774_746_000 - 1, &berlin));
        // A window wholly inside that gap does not open that Sunday.
        let lost = Window::parse("sun 02:15-02:45").unwrap();
        assert_eq!(lost.next_open(saturday_noon, &berlin), Some(1_774_746_000 + 7 * 86_400 - 45 * 60), "the next Sunday, 02:15 CEST = 00:15 UTC");
        let e = Zone::get("Mars/Olympus_Mons").unwrap_err();
        assert!(e.contains("unknown time zone \"Mars/Olympus_Mons\""), "{e}");
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        for (w, says) in [
            ("mon-fry 09:00-17:00", "unknown day"),
            ("09:00", "time range"),
            ("25:00-26:00", "not a time"),
            ("10:00-10:00", "same time"),
            ("24:00-02:00", "cannot start at 24:00"),
        ] {
            let e = Window::parse(w).unwrap_err();
            assert!(e.contains(says), "{w}: {e}");
        }
    }

    #[test]
    fn base64_matches_the_standard() {
        for (raw, enc) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("x-access-token:ghp_1", "eC1hY2Nlc3MtdG9rZW46Z2hwXzE=")] {
            assert_eq!(base64_encode(raw.as_bytes()), enc, "{raw}");
        }
    }

    #[test]
    fn credentials_in_a_repository_url_are_hidden() {
        assert_eq!(redact_userinfo("https://bot:s3cret@git.example.org/ops.git"), "https://bot:***@git.example.org/ops.git");
        assert_eq!(redact_userinfo("https://ghp_token@github.com/o/r.git"), "https://***@github.com/o/r.git");
        assert_eq!(redact_userinfo("git@github.com:o/r.git"), "git@github.com:o/r.git");
        assert_eq!(redact_userinfo("/srv/config.git"), "/srv/config.git");
    }

    #[test]
    fn branch_names_are_checked() {
        for ok in ["main", "release/1.4", "feature_x-2"] {
            assert!(valid_branch(ok), "{ok}");
        }
        for bad in ["", "-rf", "../../etc", "a..b", "$(touch x)", "a b", "/abs", "x.lock", "a//b", "ref;rm"] {
            assert!(!valid_branch(bad), "{bad}");
        }
    }
}
