//! Lua's pattern matching (`string.find`, `match`, `gmatch`, `gsub`) with an end
//! (docs/security.md, "The Lua sandbox").
//!
//! Lua's own matcher runs in C, where no instruction hook reaches it, and it
//! backtracks: `string.rep("a", 3000):find(string.rep("a-", 12) .. "b")` runs for
//! longer than anyone waits, and a handler doing so held its worker thread past its
//! `timeout` and through a shutdown, which left the thread behind. This is the same
//! matcher, step for step (Lua 5.4's `lstrlib.c`, whose results and errors the
//! sandbox's functions give), counting its steps, the bytes of a `[...]` class it
//! reads among them: it stops with the running code's deadline once that has passed,
//! and, for code that has no deadline (a process, a handler without `timeout`), with
//! an error past [`budget`] steps. Plain searches are a linear search of Rust's
//! (`memchr`), where Lua's C one took the product of the two lengths. A string
//! `gsub` builds stays within the state's memory limit, which counts only what Lua
//! allocates. The sandbox's Lua side ([`FUNCTIONS`]) takes the arguments as the C
//! functions do, and runs `gsub`'s calls of a replacement function or table in Lua,
//! where the hook sees them.

use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Value as LuaValue};

use crate::slices::Clock;

/// Lua's limit on captures (`LUA_MAXCAPTURES`).
const MAX_CAPTURES: usize = 32;
/// Lua's limit on the matcher's recursion (`MAXCCALLS`), which says "pattern too
/// complex" past it.
const MAX_DEPTH: u32 = 200;
/// How many steps pass between two looks at the deadline.
const LOOK_EVERY: u64 = 1 << 14;

/// The most steps one call may take where the running code has no deadline: a fixed
/// part, and a part that grows with the subject, so that linear work on long
/// subjects passes (a `gsub` takes a few steps a byte), while backtracking that grows
/// as a power of the length stops; at most [`MAX_BUDGET`], so that a stop is never
/// held much longer (0.7 s for 100 million steps in a release build; a shutdown
/// waits `stop_timeout`, 10 s by default).
fn budget(subject_len: usize) -> u64 {
    (100_000_000 + 1_000 * subject_len as u64).min(MAX_BUDGET)
}

/// The most any call may take, with a deadline or without: about 7 s in a release
/// build, during which the matcher holds its Lua state (it never yields) and a stop
/// waits for it.
const MAX_BUDGET: u64 = 1_000_000_000;

/// Lua's message for an allocation past the state's memory limit.
const NOT_ENOUGH_MEMORY: &str = "not enough memory";

/// A capture's length while it is open, and for a position capture.
const UNFINISHED: isize = -1;
const POSITION: isize = -2;

/// Why a match stopped: the message of the error the Lua function raises.
type Stop = String;

/// One match in progress (`MatchState`).
struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    depth: u32,
    level: usize,
    capture: [(usize, isize); MAX_CAPTURES],
    steps: u64,
    /// When the clock (and the budget) are looked at next.
    next_look: u64,
    /// The most steps: [`budget`] without a deadline, [`MAX_BUDGET`] with one (the
    /// matcher never yields, so a long `timeout` held every handler of the state).
    budget: u64,
    clock: &'a Clock,
}

/// A capture as Lua gets it.
enum Capture<'a> {
    Text(&'a [u8]),
    Position(usize),
}

impl<'a> Matcher<'a> {
    fn new(src: &'a [u8], pat: &'a [u8], clock: &'a Clock) -> Self {
        Matcher {
            src,
            pat,
            depth: MAX_DEPTH,
            level: 0,
            capture: [(0, 0); MAX_CAPTURES],
            steps: 0,
            next_look: LOOK_EVERY,
            budget: if clock.has_deadline() {
                MAX_BUDGET
            } else {
                budget(src.len())
            },
            clock,
        }
    }

    /// The pattern's byte at `i`, and `\0` past its end, as C reads its strings.
    fn p(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    /// The subject's byte at `i`, and `\0` past its end.
    fn s(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn step(&mut self) -> Result<(), Stop> {
        self.step_by(1)
    }

    /// Counts `n` steps, and looks at the deadline and the budget once enough have
    /// passed since the last look.
    fn step_by(&mut self, n: u64) -> Result<(), Stop> {
        self.steps += n;
        if self.steps < self.next_look {
            return Ok(());
        }
        self.next_look = self.steps + LOOK_EVERY;
        if let Some(overdue) = self.clock.overdue() {
            return Err(overdue);
        }
        match self.budget {
            budget if self.steps > budget => Err(format!(
                "pattern too complex for a subject of {} bytes: stopped after {} steps (docs/security.md, \"The Lua sandbox\")",
                self.src.len(),
                self.steps
            )),
            _ => Ok(()),
        }
    }

    /// The steps of reading the class of the pattern at `p..ep` once: a `[...]` class
    /// is read byte by byte, and may be as long as the state can hold.
    fn class_steps(p: usize, ep: usize) -> u64 {
        ((ep - p) / 8) as u64
    }

    fn reset(&mut self) {
        self.depth = MAX_DEPTH;
        self.level = 0;
    }

    fn check_capture(&self, l: u8) -> Result<usize, Stop> {
        let l = i32::from(l) - i32::from(b'1');
        match usize::try_from(l) {
            Ok(l) if l < self.level && self.capture[l].1 != UNFINISHED => Ok(l),
            _ => Err(format!("invalid capture index %{}", l + 1)),
        }
    }

    fn capture_to_close(&self) -> Result<usize, Stop> {
        (0..self.level)
            .rev()
            .find(|&l| self.capture[l].1 == UNFINISHED)
            .ok_or_else(|| "invalid pattern capture".to_string())
    }

    fn class_end(&self, mut p: usize) -> Result<usize, Stop> {
        let c = self.p(p);
        p += 1;
        match c {
            b'%' => {
                if p >= self.pat.len() {
                    return Err("malformed pattern (ends with '%')".to_string());
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.p(p) == b'^' {
                    p += 1;
                }
                loop {
                    if p >= self.pat.len() {
                        return Err("malformed pattern (missing ']')".to_string());
                    }
                    let c = self.p(p);
                    p += 1;
                    if c == b'%' && p < self.pat.len() {
                        p += 1;
                    }
                    if self.p(p) == b']' {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    fn match_bracket_class(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.p(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !sig;
            }
            if self.p(p) == b'%' {
                p += 1;
                if match_class(c, self.p(p)) {
                    return sig;
                }
            } else if self.p(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.p(p - 2) <= c && c <= self.p(p) {
                    return sig;
                }
            } else if self.p(p) == c {
                return sig;
            }
        }
    }

    fn single_match(&self, s: usize, p: usize, ep: usize) -> bool {
        if s >= self.src.len() {
            return false;
        }
        let c = self.src[s];
        match self.p(p) {
            b'.' => true,
            b'%' => match_class(c, self.p(p + 1)),
            b'[' => self.match_bracket_class(c, p, ep - 1),
            other => other == c,
        }
    }

    fn match_balance(&mut self, s: usize, p: usize) -> Result<Option<usize>, Stop> {
        if p + 1 >= self.pat.len() {
            return Err("malformed pattern (missing arguments to '%b')".to_string());
        }
        if self.s(s) != self.p(p) {
            return Ok(None);
        }
        let (b, e) = (self.p(p), self.p(p + 1));
        let mut open = 1;
        let mut s = s;
        loop {
            s += 1;
            if s >= self.src.len() {
                return Ok(None);
            }
            self.step()?;
            if self.src[s] == e {
                open -= 1;
                if open == 0 {
                    return Ok(Some(s + 1));
                }
            } else if self.src[s] == b {
                open += 1;
            }
        }
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Result<Option<usize>, Stop> {
        let class = 1 + Self::class_steps(p, ep);
        let mut i = 0;
        while self.single_match(s + i, p, ep) {
            self.step_by(class)?;
            i += 1;
        }
        loop {
            if let Some(res) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(res));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Result<Option<usize>, Stop> {
        let class = Self::class_steps(p, ep);
        loop {
            if let Some(res) = self.do_match(s, ep + 1)? {
                return Ok(Some(res));
            }
            self.step_by(class)?;
            if self.single_match(s, p, ep) {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: isize) -> Result<Option<usize>, Stop> {
        if self.level >= MAX_CAPTURES {
            return Err("too many captures".to_string());
        }
        self.capture[self.level] = (s, what);
        self.level += 1;
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.level -= 1;
        }
        Ok(res)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Result<Option<usize>, Stop> {
        let l = self.capture_to_close()?;
        self.capture[l].1 = (s - self.capture[l].0) as isize;
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.capture[l].1 = UNFINISHED;
        }
        Ok(res)
    }

    fn match_capture(&mut self, s: usize, l: u8) -> Result<Option<usize>, Stop> {
        let l = self.check_capture(l)?;
        let (init, len) = self.capture[l];
        let len = len as usize;
        if self.src.len() - s >= len {
            // A comparison as long as the capture: `(.*)%1` compares at every place.
            self.step_by((len / 8) as u64)?;
        }
        if self.src.len() - s >= len && self.src[init..init + len] == self.src[s..s + len] {
            Ok(Some(s + len))
        } else {
            Ok(None)
        }
    }

    /// Matches the pattern from `p` against the subject from `s`: where the match
    /// ends, if it does (`match` in `lstrlib.c`, its tail calls made a loop).
    fn do_match(&mut self, mut s: usize, mut p: usize) -> Result<Option<usize>, Stop> {
        if self.depth == 0 {
            return Err("pattern too complex".to_string());
        }
        self.depth -= 1;
        let result = loop {
            self.step()?;
            if p == self.pat.len() {
                break Some(s);
            }
            match self.p(p) {
                b'(' => {
                    break if self.p(p + 1) == b')' {
                        self.start_capture(s, p + 2, POSITION)?
                    } else {
                        self.start_capture(s, p + 1, UNFINISHED)?
                    };
                }
                b')' => break self.end_capture(s, p + 1)?,
                b'$' if p + 1 == self.pat.len() => {
                    break (s == self.src.len()).then_some(s);
                }
                b'%' if self.p(p + 1) == b'b' => match self.match_balance(s, p + 2)? {
                    Some(end) => {
                        s = end;
                        p += 4;
                        continue;
                    }
                    None => break None,
                },
                b'%' if self.p(p + 1) == b'f' => {
                    p += 2;
                    if self.p(p) != b'[' {
                        return Err("missing '[' after '%f' in pattern".to_string());
                    }
                    let ep = self.class_end(p)?;
                    self.step_by(3 * Self::class_steps(p, ep))?;
                    let previous = if s == 0 { 0 } else { self.src[s - 1] };
                    if !self.match_bracket_class(previous, p, ep - 1)
                        && self.match_bracket_class(self.s(s), p, ep - 1)
                    {
                        p = ep;
                        continue;
                    }
                    break None;
                }
                b'%' if self.p(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.p(p + 1))? {
                        Some(end) => {
                            s = end;
                            p += 2;
                            continue;
                        }
                        None => break None,
                    }
                }
                _ => {
                    let ep = self.class_end(p)?;
                    self.step_by(2 * Self::class_steps(p, ep))?;
                    let suffix = self.p(ep);
                    if !self.single_match(s, p, ep) {
                        if matches!(suffix, b'*' | b'?' | b'-') {
                            p = ep + 1;
                            continue;
                        }
                        break None;
                    }
                    match suffix {
                        b'?' => match self.do_match(s + 1, ep + 1)? {
                            Some(res) => break Some(res),
                            None => {
                                p = ep + 1;
                                continue;
                            }
                        },
                        b'+' => break self.max_expand(s + 1, p, ep)?,
                        b'*' => break self.max_expand(s, p, ep)?,
                        b'-' => break self.min_expand(s, p, ep)?,
                        _ => {
                            s += 1;
                            p = ep;
                            continue;
                        }
                    }
                }
            }
        };
        self.depth += 1;
        Ok(result)
    }

    /// Capture `i` of a match of `start..end` (`get_onecapture`): the whole match
    /// when there are no captures and `i` is 0.
    fn capture(&self, i: usize, start: usize, end: usize) -> Result<Capture<'a>, Stop> {
        if i >= self.level {
            if i != 0 {
                return Err(format!("invalid capture index %{}", i + 1));
            }
            return Ok(Capture::Text(&self.src[start..end]));
        }
        let (init, len) = self.capture[i];
        match len {
            UNFINISHED => Err("unfinished capture".to_string()),
            POSITION => Ok(Capture::Position(init + 1)),
            len => Ok(Capture::Text(&self.src[init..init + len as usize])),
        }
    }

    /// The captures of a match of `start..end` as Lua values (`push_captures`); the
    /// whole match when the pattern has none, unless `whole` is false.
    fn captures(
        &self,
        lua: &Lua,
        start: usize,
        end: usize,
        whole: bool,
        into: &mut MultiValue,
    ) -> Result<(), Stop> {
        let count = if self.level == 0 && whole {
            1
        } else {
            self.level
        };
        for i in 0..count {
            into.push_back(value_of(lua, self.capture(i, start, end)?)?);
        }
        Ok(())
    }

    /// The first match at `from` or after (only at `from` when `anchored`) whose end is
    /// not `last`: where it starts and ends.
    fn search(
        &mut self,
        from: usize,
        anchored: bool,
        last: Option<usize>,
    ) -> Result<Option<(usize, usize)>, Stop> {
        let mut start = from;
        while start <= self.src.len() {
            self.reset();
            if let Some(end) = self.do_match(start, 0)?
                && Some(end) != last
            {
                return Ok(Some((start, end)));
            }
            if anchored {
                break;
            }
            start += 1;
        }
        Ok(None)
    }
}

fn value_of(lua: &Lua, capture: Capture<'_>) -> Result<LuaValue, Stop> {
    match capture {
        Capture::Text(text) => lua
            .create_string(text)
            .map(LuaValue::String)
            .map_err(stop_of),
        Capture::Position(at) => Ok(LuaValue::Integer(at as i64)),
    }
}

/// What a string the state could not make says: Lua's own words at the memory limit,
/// where mlua's are `memory error: not enough memory` (review).
fn stop_of(e: mlua::Error) -> Stop {
    match e {
        mlua::Error::MemoryError(_) => NOT_ENOUGH_MEMORY.to_string(),
        other => other.to_string(),
    }
}

/// `match_class`: `c` against the class letter `cl` (`%a`, `%D`, ...), with C's
/// `ctype` in the "C" locale.
fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => c.is_ascii_whitespace() || c == 0x0b,
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0,
        _ => return cl == c,
    };
    if cl.is_ascii_lowercase() { res } else { !res }
}

/// What the sandbox's Lua side calls (see [`FUNCTIONS`]): `search(s, p, from, last,
/// how)` finds the first match of `p` in `s` at 0-based `from` or after whose end is
/// not `last` (nil for none), anchored when `p` starts with `^` (but for `"gmatch"`,
/// which reads `^` as a character, as Lua 5.4 does), and returns by `how`: `"find"`
/// its start and end (1-based) and the captures; `"match"` the captures, or the whole
/// match; `"gmatch"` and `"next"` (`gsub` with a function) where it starts and ends
/// (0-based) and the captures or the whole match; `"first"` (`gsub` with a table) the
/// same with the first capture alone. `"gsub"` is `gsub` with a
/// string replacement, whole: `from` the most replacements, `last` the replacement;
/// it returns the new string and the count. `"plain"` is `find`'s plain search: its
/// start and end. No match: nothing. A refusal: `false` and the error's message.
fn search_function(lua: &Lua, clock: Rc<Clock>) -> mlua::Result<Function> {
    lua.create_function(
        move |lua,
              (s, p, from, last, how): (
            mlua::LuaString,
            mlua::LuaString,
            i64,
            LuaValue,
            mlua::LuaString,
        )| {
            let (subject, s, p) = (&s, s.as_bytes(), p.as_bytes());
            let found = match &*how.as_bytes() {
                b"gsub" => gsub(lua, (subject, &s), &p, from, &last, &clock),
                how => search(lua, &s, &p, from, &last, how, &clock),
            };
            Ok(found.unwrap_or_else(|why| {
                MultiValue::from_iter([
                    LuaValue::Boolean(false),
                    lua.create_string(why)
                        .map_or(LuaValue::Nil, LuaValue::String),
                ])
            }))
        },
    )
}

fn search(
    lua: &Lua,
    s: &[u8],
    p: &[u8],
    from: i64,
    last: &LuaValue,
    how: &[u8],
    clock: &Clock,
) -> Result<MultiValue, Stop> {
    let from = usize::try_from(from).unwrap_or(usize::MAX);
    let last = match last {
        LuaValue::Integer(n) => usize::try_from(*n).ok(),
        _ => None,
    };
    if how == b"plain" {
        // Lua's `lmemfind` compares at every place the first byte matches: the
        // product of the two lengths. A linear search finds the same first place.
        let mut out = MultiValue::new();
        let found = s
            .get(from..)
            .and_then(|rest| memchr::memmem::find(rest, p))
            .map(|at| from + at);
        if let Some(at) = found {
            out.push_back(LuaValue::Integer(at as i64 + 1));
            out.push_back(LuaValue::Integer((at + p.len()) as i64));
        }
        return Ok(out);
    }
    // `gmatch` reads a `^` as a character, the others as the anchor.
    let (anchored, pattern) = match (how, p.strip_prefix(b"^")) {
        (b"gmatch", _) | (_, None) => (false, p),
        (_, Some(rest)) => (true, rest),
    };
    let mut matcher = Matcher::new(s, pattern, clock);
    let mut out = MultiValue::new();
    let Some((start, end)) = matcher.search(from, anchored, last)? else {
        return Ok(out);
    };
    match how {
        b"find" => {
            out.push_back(LuaValue::Integer(start as i64 + 1));
            out.push_back(LuaValue::Integer(end as i64));
            matcher.captures(lua, start, end, false, &mut out)?;
        }
        b"match" => matcher.captures(lua, start, end, true, &mut out)?,
        // A table replacement is indexed by the first capture alone: a later one may
        // be unfinished without an error.
        b"first" => {
            out.push_back(LuaValue::Integer(start as i64));
            out.push_back(LuaValue::Integer(end as i64));
            out.push_back(value_of(lua, matcher.capture(0, start, end)?)?);
        }
        _ => {
            out.push_back(LuaValue::Integer(start as i64));
            out.push_back(LuaValue::Integer(end as i64));
            matcher.captures(lua, start, end, true, &mut out)?;
        }
    }
    Ok(out)
}

/// `gsub` with a string replacement, whole (`str_gsub` and `add_s`), on `subject`
/// (the Lua string, and its bytes).
fn gsub(
    lua: &Lua,
    (subject, s): (&mlua::LuaString, &[u8]),
    p: &[u8],
    most: i64,
    replacement: &LuaValue,
    clock: &Clock,
) -> Result<MultiValue, Stop> {
    let LuaValue::String(replacement) = replacement else {
        return Err("gsub: the replacement is not a string".to_string());
    };
    let replacement = replacement.as_bytes();
    // Each `%` of the replacement is read at every match, whatever it adds.
    let escapes = replacement.iter().filter(|&&c| c == b'%').count();
    let (anchored, pattern) = match p.strip_prefix(b"^") {
        Some(rest) => (true, rest),
        None => (false, p),
    };
    let mut matcher = Matcher::new(s, pattern, clock);
    // What the state may still take: the result is made a Lua string at the end, and
    // a buffer past that was memory no limit counted (`("a"):rep(1e6):gsub("a", s)`
    // asked for a terabyte).
    let mut room = Room::of(lua);
    let mut out: Vec<u8> = Vec::with_capacity(s.len().min(room.bytes));
    let mut src = 0;
    let mut last = None;
    let mut count: i64 = 0;
    while count < most {
        matcher.reset();
        match matcher.do_match(src, 0)? {
            Some(end) if Some(end) != last => {
                count += 1;
                let before = out.len();
                add_replacement(&matcher, &mut out, &replacement, src, end, &mut room)?;
                // Reading the replacement and copying what it adds take time too:
                // `%0` of empty matches in a replacement of megabytes copied nothing
                // and read it all at every match. Its bytes are copied in runs, 64 a
                // step; each `%` read is two (it took about 80 ns a `%`, counted as
                // 1/64 of a step, so that the most steps took 80 s, not 7: review).
                let read = replacement.len() + out.len() - before;
                matcher.step_by((read / 64 + 2 * escapes) as u64)?;
                src = end;
                last = Some(end);
            }
            _ if src < s.len() => {
                out.push(s[src]);
                src += 1;
            }
            _ => break,
        }
        if anchored {
            break;
        }
    }
    if count == 0 {
        // The subject itself, as Lua gives it: a copy of a long one could be past the
        // memory limit (review).
        return Ok(MultiValue::from_iter([
            LuaValue::String(subject.clone()),
            LuaValue::Integer(0),
        ]));
    }
    out.extend_from_slice(&s[src..]);
    let result = lua.create_string(&out).map_err(stop_of)?;
    Ok(MultiValue::from_iter([
        LuaValue::String(result),
        LuaValue::Integer(count),
    ]))
}

/// How many more bytes the state may allocate before its memory limit.
struct Room<'a> {
    lua: &'a Lua,
    bytes: usize,
    /// Whether a full collection was run to make more room.
    collected: bool,
}

impl<'a> Room<'a> {
    fn of(lua: &'a Lua) -> Room<'a> {
        Room {
            lua,
            bytes: Room::left(lua),
            collected: false,
        }
    }

    fn left(lua: &Lua) -> usize {
        // mlua has no getter: the limit is read by setting one, and set back at once.
        let limit = lua.set_memory_limit(0).unwrap_or(0);
        let _ = lua.set_memory_limit(limit);
        match limit {
            0 => usize::MAX,
            limit => limit.saturating_sub(lua.used_memory()),
        }
    }

    /// Whether `len` bytes fit; past the room once, after a full collection, as
    /// Lua's allocator collects before it gives up (what the state holds counts
    /// garbage too).
    fn fits(&mut self, len: usize) -> Result<(), Stop> {
        if len <= self.bytes {
            return Ok(());
        }
        if !self.collected {
            self.collected = true;
            let _ = self.lua.gc_collect();
            self.bytes = Room::left(self.lua);
            if len <= self.bytes {
                return Ok(());
            }
        }
        Err(NOT_ENOUGH_MEMORY.to_string())
    }
}

/// `add_s`: the replacement string with `%0`–`%9` and `%%` read.
/// Each piece is checked against the `room` before it is added: one replacement of
/// many `%0` of a long match asked for hundreds of gigabytes at once.
fn add_replacement(
    matcher: &Matcher<'_>,
    out: &mut Vec<u8>,
    replacement: &[u8],
    start: usize,
    end: usize,
    room: &mut Room<'_>,
) -> Result<(), Stop> {
    let mut add = |out: &mut Vec<u8>, piece: &[u8]| {
        room.fits(out.len().saturating_add(piece.len()))?;
        out.extend_from_slice(piece);
        Ok::<(), Stop>(())
    };
    let mut i = 0;
    while i < replacement.len() {
        // Up to the next `%` in one piece: byte by byte, a replacement of megabytes
        // took milliseconds a match.
        let run = replacement[i..]
            .iter()
            .position(|&c| c == b'%')
            .unwrap_or(replacement.len() - i);
        if run > 0 {
            add(out, &replacement[i..i + run])?;
            i += run;
            continue;
        }
        i += 1;
        let d = replacement.get(i).copied().unwrap_or(0);
        i += 1;
        match d {
            b'%' => add(out, b"%")?,
            b'0' => add(out, &matcher.src[start..end])?,
            b'1'..=b'9' => match matcher.capture(usize::from(d - b'1'), start, end)? {
                Capture::Text(text) => add(out, text)?,
                Capture::Position(at) => add(out, at.to_string().as_bytes())?,
            },
            _ => return Err("invalid use of '%' in replacement string".to_string()),
        }
    }
    Ok(())
}

/// The sandbox's `string.find`, `match`, `gmatch` and `gsub`, over [`search_function`].
/// Arguments the C functions would refuse go to them (`relay`), which refuse them
/// before matching anything.
const FUNCTIONS: &str = r##"
local search, relay, find, match, gmatch, gsub, sub, concat, type, tostring, tonumber,
      tointeger, error = ...
-- A pattern with none of these is searched for as plain text, as `find` does.
local SPECIALS = "[%^%$%*%+%?%.%(%[%%%-]"
-- Plain text this short is searched for by Lua's own function: its comparisons at a
-- place stop within this many bytes, so that it takes linear time too, and 24 ns a
-- call where the linear search of Rust's takes 475.
local SHORT = 16

local function text(v)
  local t = type(v)
  return t == "string" or t == "number"
end

-- The integer the C functions read from an optional argument (`default` for nil), or
-- nil where they refuse it.
local function integer(v, default)
  if v == nil then
    return default
  end
  if not text(v) then
    return nil
  end
  local n = tonumber(v)
  return n and tointeger(n)
end

-- A 1-based position in a string of `len` bytes, 0-based, as the C functions read it.
local function start_of(pos, len)
  if pos > 0 then
    return pos - 1
  elseif pos == 0 or pos < -len then
    return 0
  end
  return len + pos
end

-- The subject and the pattern as strings and the 0-based place to start at, as the
-- C functions read their arguments; nothing where they refuse them (the caller then
-- hands them to the C function, which says why).
local function arguments(s, p, init)
  local i = integer(init, 1)
  if not (text(s) and text(p) and i) then
    return nil
  end
  s, p = tostring(s), tostring(p)
  return s, p, start_of(i, #s)
end

-- What `search` found, nil for nothing; its refusal raised where the library
-- function was called (a tail call from it).
local function found(first, ...)
  if first == false then
    error((...), 2)
  end
  if first == nil then
    return nil
  end
  return first, ...
end

local function bounded_find(s, p, init, plain)
  local subject, pattern, start = arguments(s, p, init)
  if not subject then
    return relay(2, "find", find, s, p, init, plain)
  end
  s, p = subject, pattern
  if start > #s then
    return nil
  end
  if plain or not find(p, SPECIALS) then
    -- Lua's own search takes at most this many comparisons a byte.
    if #p <= SHORT then
      return find(s, p, init, plain)
    end
    return found(search(s, p, start, nil, "plain"))
  end
  return found(search(s, p, start, nil, "find"))
end

local function bounded_match(s, p, init)
  local subject, pattern, start = arguments(s, p, init)
  if not subject then
    return relay(2, "match", match, s, p, init)
  end
  if start > #subject then
    return nil
  end
  return found(search(subject, pattern, start, nil, "match"))
end

local function bounded_gmatch(s, p, init)
  local subject, pattern, src = arguments(s, p, init)
  if not subject then
    return relay(2, "gmatch", gmatch, s, p, init)
  end
  s, p = subject, pattern
  if src > #s then
    src = #s + 1
  end
  local last = nil
  local function advance(start, e, ...)
    if start == false then
      error(e, 2)
    end
    if start == nil then
      return
    end
    src, last = e, e
    return ...
  end
  return function()
    return advance(search(s, p, src, last, "gmatch"))
  end
end

local function bounded_gsub(s, p, repl, n)
  local tr = type(repl)
  local most = text(s) and integer(n, #tostring(s) + 1)
  if not (most and text(p)
      and (tr == "string" or tr == "number" or tr == "function" or tr == "table")) then
    return relay(2, "gsub", gsub, s, p, repl, n)
  end
  s, p = tostring(s), tostring(p)
  if tr ~= "function" and tr ~= "table" then
    return found(search(s, p, most, tostring(repl), "gsub"))
  end
  -- The replacement's calls run here, in Lua, where the time limits see them.
  local function replaced(start, e, ...)
    if start == false then
      error(e, 3)
    end
    if start == nil then
      return nil
    end
    if tr == "function" then
      return start, e, (repl(...))
    end
    return start, e, repl[(...)]
  end
  local how = tr == "table" and "first" or "next"
  local anchored = sub(p, 1, 1) == "^"
  local parts, count, src, last, changed = {}, 0, 0, nil, false
  while count < most do
    local start, e, value = replaced(search(s, p, src, last, how))
    if start == nil then
      break
    end
    count = count + 1
    parts[#parts + 1] = sub(s, src + 1, start)
    if not value then
      parts[#parts + 1] = sub(s, start + 1, e)
    elseif text(value) then
      parts[#parts + 1] = tostring(value)
      changed = true
    else
      error("invalid replacement value (a " .. type(value) .. ")", 2)
    end
    src, last = e, e
    if anchored then
      break
    end
  end
  if not changed then
    return s, count
  end
  parts[#parts + 1] = sub(s, src + 1)
  return concat(parts), count
end

return bounded_find, bounded_match, bounded_gmatch, bounded_gsub
"##;

/// Puts the bounded `find`, `match`, `gmatch` and `gsub` in the real `string` table,
/// which every string's metatable reaches too. `relay` is the sandbox's: it calls a C
/// library function and raises its refusal where the caller called.
pub(crate) fn install(
    lua: &Lua,
    real: &Table,
    relay: Function,
    clock: &Rc<Clock>,
) -> mlua::Result<()> {
    let string: Table = real.raw_get("string")?;
    let table: Table = real.raw_get("table")?;
    let math: Table = real.raw_get("math")?;
    let (find, match_, gmatch, gsub): (Function, Function, Function, Function) =
        lua.load(FUNCTIONS).set_name("=sandbox").call((
            search_function(lua, Rc::clone(clock))?,
            relay,
            string.raw_get::<Function>("find")?,
            string.raw_get::<Function>("match")?,
            string.raw_get::<Function>("gmatch")?,
            string.raw_get::<Function>("gsub")?,
            string.raw_get::<Function>("sub")?,
            table.raw_get::<Function>("concat")?,
            real.raw_get::<Function>("type")?,
            real.raw_get::<Function>("tostring")?,
            real.raw_get::<Function>("tonumber")?,
            math.raw_get::<Function>("tointeger")?,
            real.raw_get::<Function>("error")?,
        ))?;
    string.raw_set("find", find)?;
    string.raw_set("match", match_)?;
    string.raw_set("gmatch", gmatch)?;
    string.raw_set("gsub", gsub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A state whose `string` functions are the bounded ones, with Lua's own kept in
    /// `C`, and `compare(s, p, init, repl_kind, repl, n)` giving what each set says
    /// to the same calls (errors without their position).
    fn harness() -> Lua {
        let (lua, _clock) = bounded();
        lua.load(COMPARE).exec().unwrap();
        lua
    }

    const COMPARE: &str = r##"
local cgsub = C.gsub
local function strip(msg)
  if type(msg) == "string" then return (cgsub(msg, "^[^:]*:%d+: ", "")) end
  return tostring(msg)
end
local function show(ok, ...)
  local out = { ok and "ok" or "err" }
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    out[#out + 1] = ok and (type(v) .. ":" .. tostring(v)) or strip(v)
  end
  return table.concat(out, "|")
end
local function gather(lib, s, p, init)
  local ok, it = pcall(lib.gmatch, s, p, init)
  if not ok then return "err|" .. strip(it) end
  local out = {}
  for _ = 1, 40 do
    local r = table.pack(pcall(it))
    if not r[1] then out[#out + 1] = "err|" .. strip(r[2]); break end
    out[#out + 1] = show(table.unpack(r, 1, r.n))
    if r.n == 1 then break end
  end
  return table.concat(out, ";")
end
function compare(s, p, init, repl_kind, repl_s, n)
  local said = {}
  for _, lib in ipairs({ C, string }) do
    local repl = repl_s
    if repl_kind == "function" then
      repl = function(a, b)
        if a == "a" then return nil end
        if a == "b" then return 7 end
        return "<" .. tostring(a) .. ">" .. tostring(b)
      end
    elseif repl_kind == "table" then
      repl = { a = "A", b = false, [1] = 7, ["("] = {} }
    end
    said[#said + 1] = table.concat({
      show(pcall(lib.find, s, p, init)),
      show(pcall(lib.find, s, p, init, true)),
      -- Past 16 bytes a plain search is the linear one.
      show(pcall(lib.find, s .. p .. p .. p .. s, p .. p .. p, init, true)),
      show(pcall(lib.match, s, p, init)),
      gather(lib, s, p, init),
      show(pcall(lib.gsub, s, p, repl, n)),
    }, "\n")
  end
  return said[1], said[2]
end
"##;

    fn pattern() -> impl Strategy<Value = String> {
        let token = prop::sample::select(vec![
            "a", "b", ".", "%a", "%d", "%s", "%w", "%p", "[ab]", "[^a]", "[a-c]", "[%d(]", "*",
            "+", "-", "?", "(", ")", "()", "%1", "%2", "%b()", "%f[a]", "%f[%s]", "^", "$", "%",
            "[", "]", "%%", "x", " ", "\0", "%S", "%D", "%u", "%c", "[]]", "[^%]]", "[a-]", "%z",
            "%.", "%(",
        ]);
        prop::collection::vec(token, 0..7).prop_map(|tokens| tokens.concat())
    }

    fn subject() -> impl Strategy<Value = String> {
        let c = prop::sample::select(vec!['a', 'b', 'c', '(', ')', '1', ' ', 'x', '^', '%', '\0']);
        prop::collection::vec(c, 0..14).prop_map(|cs| cs.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The bounded functions say what Lua's own say, results and refusals alike.
        #[test]
        fn the_bounded_functions_say_what_luas_own_say(
            s in subject(),
            p in pattern(),
            init in prop::option::of(-16i64..16),
            repl_kind in prop::sample::select(vec!["string", "function", "table"]),
            repl in prop::sample::select(vec!["%0", "%1", "<%2>", "x%%y", "%", "%x", "", "%1%1"]),
            n in prop::option::of(-1i64..3),
        ) {
            let lua = harness();
            let compare: Function = lua.globals().get("compare").unwrap();
            let (lua_said, bounded_said): (String, String) = compare
                .call((s.as_str(), p.as_str(), init, repl_kind, repl, n))
                .unwrap();
            prop_assert_eq!(lua_said, bounded_said, "s {:?} p {:?} init {:?}", s, p, init);
        }
    }

    /// A state with the bounded functions, Lua's own kept in `C`, and its clock.
    fn bounded() -> (Lua, Rc<Clock>) {
        let lua = Lua::new();
        lua.load("C = { find = string.find, match = string.match, gmatch = string.gmatch, gsub = string.gsub }")
            .exec()
            .unwrap();
        let clock = Rc::new(Clock::default());
        let relay: Function = lua
            .load("return function(level, name, f, ...) return f(...) end")
            .eval()
            .unwrap();
        install(&lua, &lua.globals(), relay, &clock).unwrap();
        (lua, clock)
    }

    /// Runs `code` under a deadline of 200 ms: it ends with the deadline's error,
    /// within `secs` seconds.
    fn ends_at_the_deadline(lua: &Lua, clock: &Clock, code: &str, secs: u64) {
        let deadline = crate::slices::Deadline::after(
            std::time::Duration::from_millis(200),
            "the handler ran past its timeout",
        );
        let started = std::time::Instant::now();
        let err = clock
            .within(deadline, || lua.load(code).exec())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the handler ran past its timeout"),
            "{code}: {err}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(secs),
            "{code}"
        );
    }

    /// A `gsub` whose result the state could never hold built it in Rust's memory,
    /// which no limit counts: a terabyte for this one (review). It fails as Lua's own
    /// does at the state's limit.
    #[test]
    fn a_gsub_result_past_the_memory_limit_fails_as_lua_says() {
        let (lua, _clock) = bounded();
        lua.set_memory_limit(64 << 20).unwrap();
        let (ok, err): (bool, String) = lua
            .load("local s = string.rep('a', 1e6) return pcall(string.gsub, s, 'a', s)")
            .eval()
            .unwrap();
        assert!(!ok);
        assert_eq!(err, "not enough memory");
        lua.set_memory_limit(0).unwrap();
        let (ok, n): (String, i64) = lua
            .load("return string.gsub(string.rep('a', 1000), 'a', 'bb')")
            .eval()
            .unwrap();
        assert_eq!((ok.len(), n), (2000, 1000));
    }

    /// One replacement of many `%0` of a long match was built whole before its size
    /// was looked at (512 GiB here), and a replacement of megabytes read at every
    /// empty match counted no step (review): the first fails at the limit, the second
    /// at the deadline.
    #[test]
    fn one_big_replacement_stops_at_the_limit_and_a_long_one_at_the_deadline() {
        let (lua, clock) = bounded();
        lua.set_memory_limit(64 << 20).unwrap();
        let (ok, err): (bool, String) = lua
            .load("return pcall(string.gsub, string.rep('a', 2^20), '^.*', string.rep('%0', 2^19))")
            .eval()
            .unwrap();
        assert!(!ok);
        assert_eq!(err, "not enough memory");
        ends_at_the_deadline(
            &lua,
            &clock,
            "return string.gsub(string.rep('x', 1e5), '', string.rep('%0', 5e6))",
            10,
        );
    }

    /// Each `%` of a replacement counts as it is read at every match: counted as a
    /// 64th of a step, a replacement of `%0` on empty matches ran for 80 s before the
    /// most steps stopped it, where that most is meant as about 7 s (review). Under
    /// the budget for 6,001 matches (about 1e8 steps), these 10,000 `%` a match stop
    /// it; they passed before.
    #[test]
    fn each_percent_of_a_replacement_counts_at_every_match() {
        let (lua, _clock) = bounded();
        let err = lua
            .load("return string.gsub(string.rep('x', 6000), '', string.rep('%0', 1e4))")
            .exec()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pattern too complex for a subject of 6000 bytes"),
            "{err}"
        );
        let (out, n): (String, i64) = lua
            .load("return string.gsub('abc', '%w', '<%0%%>')")
            .eval()
            .unwrap();
        assert_eq!((out.as_str(), n), ("<a%><b%><c%>", 3));
    }

    /// A `gsub` that replaces nothing gives the subject itself, as Lua does: a copy of
    /// a long one was past the memory limit (review).
    #[test]
    fn a_gsub_that_replaces_nothing_gives_the_subject_back() {
        let (lua, _clock) = bounded();
        lua.load("s = string.rep('a', 40e6)").exec().unwrap();
        lua.set_memory_limit(lua.used_memory() + (8 << 20)).unwrap();
        let (same, n): (bool, i64) = lua
            .load("local r, n = s:gsub('^x', 'y') local r2 = s:gsub('a', 'y', 0) return r == s and r2 == s, n")
            .eval()
            .unwrap();
        assert!(same);
        assert_eq!(n, 0);
    }

    /// A capture the state cannot hold fails in Lua's words, as `gsub`'s result does:
    /// it said `memory error: not enough memory` (review).
    #[test]
    fn a_capture_past_the_memory_limit_fails_as_lua_says() {
        let (lua, _clock) = bounded();
        lua.load("s = string.rep('a', 8e6)").exec().unwrap();
        lua.set_memory_limit(lua.used_memory() + (4 << 20)).unwrap();
        let (ok, err): (bool, String) = lua
            .load("return pcall(string.match, s, '(.*)')")
            .eval()
            .unwrap();
        assert!(!ok);
        assert_eq!(err, "not enough memory");
    }

    /// What the state holds counts its garbage: a result that fits once it is
    /// collected was refused, where Lua's allocator collects first (review).
    #[test]
    fn a_gsub_result_that_fits_after_a_collection_is_made() {
        let (lua, _clock) = bounded();
        lua.set_memory_limit(64 << 20).unwrap();
        let (ok, len): (bool, i64) = lua
            .load(
                "collectgarbage('stop')
                 for i = 1, 50 do local _ = string.rep('x', 1e6 + i) end
                 local ok, r = pcall(string.gsub, string.rep('a', 4e6), 'a', 'bbb')
                 collectgarbage('restart')
                 return ok, ok and #r or 0",
            )
            .eval()
            .unwrap();
        assert!(ok);
        assert_eq!(len, 12_000_000);
    }

    /// Reading a `[...]` class counted one step whatever its length, so that a class
    /// of 4 MB read at every place of a subject ran for minutes between two looks at
    /// the clock (review). Its bytes count.
    #[test]
    fn a_long_class_counts_its_bytes_and_ends_at_the_deadline() {
        let (lua, clock) = bounded();
        ends_at_the_deadline(
            &lua,
            &clock,
            "return string.find(string.rep('a', 2000), '[' .. string.rep('b', 4e6) .. ']')",
            10,
        );
    }

    /// Lua's plain search compares at every place its first byte matches: this one
    /// took minutes, with no look at any deadline (review). A linear search finds the
    /// same places.
    #[test]
    fn a_plain_search_takes_linear_time() {
        let (lua, _clock) = bounded();
        let started = std::time::Instant::now();
        let found: Option<i64> = lua
            .load("return string.find(string.rep('a', 4e6), string.rep('a', 2e6) .. 'b')")
            .eval()
            .unwrap();
        assert_eq!(found, None);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let (start, end): (i64, i64) = lua
            .load("return string.find('xxabcabc', 'abc', 4, true)")
            .eval()
            .unwrap();
        assert_eq!((start, end), (6, 8));
    }

    /// Without a deadline the budget grows with the subject; under one, a slow
    /// search that ends in time is not cut short by it (review), but none passes the
    /// most any call may take: the matcher never yields, and a `timeout` of ten
    /// minutes held every handler of its state that long (review).
    #[test]
    fn the_budget_grows_with_the_subject_and_stops_at_the_most() {
        let clock = Clock::default();
        assert_eq!(Matcher::new(b"abc", b"a", &clock).budget, budget(3));
        let deadline =
            crate::slices::Deadline::after(std::time::Duration::from_secs(600), "too late");
        clock.within(deadline, || {
            assert_eq!(Matcher::new(b"abc", b"a", &clock).budget, MAX_BUDGET);
        });
        assert_eq!(budget(usize::MAX / 2_000), MAX_BUDGET);
    }

    /// The case that held a worker past its `timeout` in Lua's matcher: the deadline
    /// ends it, and without one the step budget does.
    #[test]
    fn backtracking_ends_at_the_deadline_or_the_budget() {
        let lua = harness();
        let search = "return string.find(string.rep('a', 3000), string.rep('a-', 12) .. 'b')";
        let started = std::time::Instant::now();
        let err = lua.load(search).exec().unwrap_err().to_string();
        assert!(
            err.contains("pattern too complex for a subject of 3000 bytes"),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(30));

        let (lua, clock) = bounded();
        ends_at_the_deadline(&lua, &clock, search, 2);
    }
}
