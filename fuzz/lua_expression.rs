//! Turns fuzz bytes into a Lua expression: scalars, strings with any bytes, lists,
//! maps, mixed and sparse tables, functions, coroutines, cycles and deep nesting.
//! Shared by the `lua_value` fuzz target and the test that replays its corpus.

/// A Lua expression built from `data`.
pub fn expression(data: &[u8]) -> String {
    let mut input = Input { data, pos: 0 };
    build(&mut input, 0)
}

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = self.data.get(self.pos).copied();
        self.pos += 1;
        b
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).filter_map(|_| self.byte()).collect()
    }
}

fn build(input: &mut Input, depth: usize) -> String {
    let Some(choice) = input.byte() else {
        return "1".to_string();
    };
    if depth > 6 && choice % 13 >= 7 {
        return "0".to_string();
    }
    match choice % 13 {
        0 => "nil".into(),
        1 => "true".into(),
        2 => {
            let raw = input.bytes(8);
            let mut buf = [0u8; 8];
            buf[..raw.len()].copy_from_slice(&raw);
            format!("math.tointeger({})", i64::from_le_bytes(buf))
        }
        3 => match input.byte().unwrap_or(0) % 5 {
            0 => "0/0".into(),
            1 => "1/0".into(),
            2 => "-1/0".into(),
            3 => "-0.0".into(),
            _ => format!("{:?}", f64::from(input.byte().unwrap_or(1)) / 7.0),
        },
        4 => {
            let n = usize::from(input.byte().unwrap_or(0) % 16);
            let text: String = input.bytes(n).iter().map(|b| format!("\\{b}")).collect();
            format!("\"{text}\"")
        }
        5 => "print".into(),
        6 => "coroutine.create(print)".into(),
        7 => {
            let n = input.byte().unwrap_or(0) % 5;
            let items: Vec<String> = (0..n).map(|_| build(input, depth + 1)).collect();
            format!("{{{}}}", items.join(", "))
        }
        8 => {
            let n = input.byte().unwrap_or(0) % 5;
            let items: Vec<String> = (0..n)
                .map(|i| {
                    format!(
                        "k{i}_{} = {}",
                        input.byte().unwrap_or(0),
                        build(input, depth + 1)
                    )
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        9 => format!("{{ 1, x = {} }}", build(input, depth + 1)),
        10 => format!(
            "{{ [{}] = {} }}",
            input.byte().unwrap_or(0) % 4 + 1,
            build(input, depth + 1)
        ),
        11 => {
            // Past the runtime's 128-level limit, but within what Lua's parser accepts
            // (about 200 nested constructors): deeper would test Lua, not us.
            let levels = usize::from(input.byte().unwrap_or(0) % 160);
            format!("{}1{}", "{".repeat(levels), "}".repeat(levels))
        }
        _ => "(function() local t = {} t.self = t return t end)()".into(),
    }
}

/// The chunk the fuzz target and the replay test run: publish the generated value and
/// headers; the outcome must be success or `INVALID`, never a crash or another kind.
pub fn chunk(data: &[u8]) -> String {
    let split = data.len() / 2;
    let body = expression(&data[..split]);
    let headers = expression(&data[split..]);
    format!(
        "local ok, err = queue.publish('fuzz:q', {body}, (function(h) if type(h) == 'table' then return h end end)({headers}))\n\
         if ok then return 'published' end\n\
         if err:kind() == 'Invalid' then return 'invalid' end\n\
         error('unexpected error: ' .. tostring(err))"
    )
}
