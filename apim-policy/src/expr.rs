//! The subset of APIM's C# policy expressions that real limit policies use:
//! counter keys built from the request, and conditions on the response status.
//! Anything else is an error that says which forms are supported.

use gateway_core::{KeyExpr, StatusPredicate};

pub const KEY_FORMS: &str = "supported key expressions: context.Request.IpAddress, context.Subscription.Id, \
    context.Subscription.Key, context.Subscription.Name, context.Product.Name, \
    context.Request.Headers.GetValueOrDefault(\"name\", \"default\") (optionally .AsJwt()?.Subject or \
    .AsJwt()?.Claims.GetValueOrDefault(\"claim\", \"default\")), string literals, joined with +";

pub const CONDITION_FORMS: &str = "supported conditions: context.Response.StatusCode compared with a number \
    (==, !=, <, <=, >, >=), combined with &&, || and ! and parentheses";

/// An expression error: what, and the byte offset in the expression.
#[derive(Debug, PartialEq, Eq)]
pub struct ExprError {
    pub offset: usize,
    pub message: String,
}

/// The body of `@(...)`, or `None` when the attribute is a plain value.
pub fn unwrap_expression(value: &str) -> Option<(&str, usize)> {
    let inner = value.trim().strip_prefix("@(")?.strip_suffix(')')?;
    let offset = value.find("@(").unwrap_or(0) + 2;
    Some((inner, offset))
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn skip_space(&mut self) {
        while self.text[self.pos..].starts_with(char::is_whitespace) {
            self.pos += self.text[self.pos..].chars().next().map_or(1, char::len_utf8);
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.text[self.pos..].starts_with(token) {
            self.pos += token.len();
            return true;
        }
        false
    }

    fn at_end(&mut self) -> bool {
        self.skip_space();
        self.pos >= self.text.len()
    }

    fn error(&self, message: impl Into<String>) -> ExprError {
        ExprError { offset: self.pos, message: message.into() }
    }

    fn string(&mut self) -> Result<String, ExprError> {
        self.skip_space();
        if !self.eat("\"") {
            return Err(self.error("expected a string literal in double quotes"));
        }
        let mut out = String::new();
        let mut chars = self.text[self.pos..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, e @ ('"' | '\\'))) => out.push(e),
                    _ => return Err(self.error("unsupported escape in a string literal")),
                },
                c => out.push(c),
            }
        }
        Err(self.error("unterminated string literal"))
    }

    fn number(&mut self) -> Option<u16> {
        self.skip_space();
        let digits = self.text[self.pos..].chars().take_while(char::is_ascii_digit).count();
        let n = self.text[self.pos..self.pos + digits].parse().ok()?;
        self.pos += digits;
        Some(n)
    }
}

/// A counter key: `context...` values and string literals joined with `+`.
pub fn parse_key(text: &str) -> Result<KeyExpr, ExprError> {
    let mut c = Cursor { text, pos: 0 };
    let mut parts = vec![key_term(&mut c)?];
    while c.eat("+") {
        parts.push(key_term(&mut c)?);
    }
    if !c.at_end() {
        return Err(c.error(format!("unexpected `{}`; {KEY_FORMS}", &text[c.pos..])));
    }
    Ok(match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => KeyExpr::Concat(parts),
    })
}

fn key_term(c: &mut Cursor<'_>) -> Result<KeyExpr, ExprError> {
    c.skip_space();
    // A cast to string changes nothing.
    c.eat("(string)");
    c.skip_space();
    if c.text[c.pos..].starts_with('"') {
        return c.string().map(KeyExpr::Const);
    }
    let simple = [
        ("context.Request.IpAddress", KeyExpr::Ip),
        ("context.Subscription.Id", KeyExpr::SubscriptionId),
        ("context.Subscription.Key", KeyExpr::SubscriptionKey),
        ("context.Subscription.Name", KeyExpr::SubscriptionName),
        ("context.Product.Name", KeyExpr::Product),
    ];
    if c.eat("context.Request.Headers.GetValueOrDefault(") {
        return header_term(c);
    }
    for (path, expr) in simple {
        if c.eat(path) {
            return Ok(expr);
        }
    }
    Err(c.error(format!("unsupported expression `{}`; {KEY_FORMS}", c.text[c.pos..].trim())))
}

fn header_term(c: &mut Cursor<'_>) -> Result<KeyExpr, ExprError> {
    let name = c.string()?;
    let default = match c.eat(",") {
        true => c.string()?,
        false => String::new(),
    };
    if !c.eat(")") {
        return Err(c.error("expected `)` after GetValueOrDefault's arguments"));
    }
    if !c.eat(".AsJwt()") {
        return Ok(KeyExpr::Header { name, default });
    }
    c.eat("?");
    if c.eat(".Subject") {
        return Ok(KeyExpr::Jwt { claim: "sub".into(), header: name, default: String::new() });
    }
    if c.eat(".Claims.GetValueOrDefault(") {
        let claim = c.string()?;
        let claim_default = if c.eat(",") { c.string()? } else { String::new() };
        if !c.eat(")") {
            return Err(c.error("expected `)` after the claim's arguments"));
        }
        return Ok(KeyExpr::Jwt { claim, header: name, default: claim_default });
    }
    Err(c.error(format!("after AsJwt() use ?.Subject or ?.Claims.GetValueOrDefault(...); {KEY_FORMS}")))
}

/// A condition on `context.Response.StatusCode`, as the set of statuses it admits.
pub fn parse_condition(text: &str) -> Result<StatusPredicate, ExprError> {
    let mut c = Cursor { text, pos: 0 };
    let set = or(&mut c)?;
    if !c.at_end() {
        return Err(c.error(format!("unexpected `{}`; {CONDITION_FORMS}", &text[c.pos..])));
    }
    Ok(to_predicate(&set))
}

/// Statuses 100 to 599, one flag each.
type StatusSet = Vec<bool>;

fn or(c: &mut Cursor<'_>) -> Result<StatusSet, ExprError> {
    let mut set = and(c)?;
    while c.eat("||") {
        let rhs = and(c)?;
        set.iter_mut().zip(rhs).for_each(|(a, b)| *a |= b);
    }
    Ok(set)
}

fn and(c: &mut Cursor<'_>) -> Result<StatusSet, ExprError> {
    let mut set = unary(c)?;
    while c.eat("&&") {
        let rhs = unary(c)?;
        set.iter_mut().zip(rhs).for_each(|(a, b)| *a &= b);
    }
    Ok(set)
}

fn unary(c: &mut Cursor<'_>) -> Result<StatusSet, ExprError> {
    if c.eat("!") && !c.text[c.pos..].starts_with('=') {
        return Ok(unary(c)?.into_iter().map(|b| !b).collect());
    }
    if c.eat("(") {
        let set = or(c)?;
        if !c.eat(")") {
            return Err(c.error("expected `)`"));
        }
        return Ok(set);
    }
    if c.eat("true") {
        return Ok(vec![true; 500]);
    }
    if c.eat("false") {
        return Ok(vec![false; 500]);
    }
    comparison(c)
}

fn comparison(c: &mut Cursor<'_>) -> Result<StatusSet, ExprError> {
    const STATUS: &str = "context.Response.StatusCode";
    let status_first = c.eat(STATUS);
    let number_first = if status_first { None } else { c.number() };
    if !status_first && number_first.is_none() {
        return Err(c.error(format!("unsupported condition `{}`; {CONDITION_FORMS}", c.text[c.pos..].trim())));
    }
    let ops = ["==", "!=", "<=", ">=", "<", ">"];
    let Some(op) = ops.into_iter().find(|op| c.eat(op)) else {
        return Err(c.error(format!("expected a comparison (==, !=, <, <=, >, >=); {CONDITION_FORMS}")));
    };
    let n = match number_first {
        Some(n) => {
            if !c.eat(STATUS) {
                return Err(c.error(format!("expected {STATUS}")));
            }
            n
        }
        None => c.number().ok_or_else(|| c.error("expected a status code number"))?,
    };
    // `N op status` is `status op' N` with the comparison mirrored.
    let op = match (number_first.is_some(), op) {
        (true, "<") => ">",
        (true, ">") => "<",
        (true, "<=") => ">=",
        (true, ">=") => "<=",
        (_, op) => op,
    };
    Ok((100u16..600)
        .map(|s| match op {
            "==" => s == n,
            "!=" => s != n,
            "<" => s < n,
            "<=" => s <= n,
            ">" => s > n,
            _ => s >= n,
        })
        .collect())
}

fn to_predicate(set: &[bool]) -> StatusPredicate {
    let mut ranges = Vec::new();
    let mut start = None;
    for (i, &on) in set.iter().chain([false].iter()).enumerate() {
        match (on, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                ranges.push((100 + s as u16, 100 + i as u16 - 1));
                start = None;
            }
            _ => {}
        }
    }
    StatusPredicate::from_ranges(ranges)
}

/// The C# condition for a predicate (the inverse of `parse_condition` over 100-599).
pub fn write_condition(p: &StatusPredicate) -> String {
    const S: &str = "context.Response.StatusCode";
    let parts: Vec<String> = p
        .ranges()
        .iter()
        .map(|&(lo, hi)| {
            let (lo, hi) = (lo.max(100), hi.min(599));
            match (lo, hi) {
                (l, h) if l == h => format!("{S} == {l}"),
                (l, 599) => format!("{S} >= {l}"),
                (100, h) => format!("{S} <= {h}"),
                (l, h) => format!("({S} >= {l} && {S} <= {h})"),
            }
        })
        .collect();
    match parts.is_empty() {
        true => "false".into(),
        false => parts.join(" || "),
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The C# expression for a key (the inverse of `parse_key`).
pub fn write_key(k: &KeyExpr) -> String {
    match k {
        KeyExpr::Ip => "context.Request.IpAddress".into(),
        KeyExpr::SubscriptionId => "context.Subscription.Id".into(),
        KeyExpr::SubscriptionKey => "context.Subscription.Key".into(),
        KeyExpr::SubscriptionName => "context.Subscription.Name".into(),
        KeyExpr::Product => "context.Product.Name".into(),
        KeyExpr::Header { name, default } => {
            format!("context.Request.Headers.GetValueOrDefault({}, {})", quote(name), quote(default))
        }
        KeyExpr::Jwt { claim, header, default } if claim == "sub" && default.is_empty() => {
            format!("context.Request.Headers.GetValueOrDefault({}, \"\").AsJwt()?.Subject", quote(header))
        }
        KeyExpr::Jwt { claim, header, default } => format!(
            "context.Request.Headers.GetValueOrDefault({}, \"\").AsJwt()?.Claims.GetValueOrDefault({}, {})",
            quote(header),
            quote(claim),
            quote(default)
        ),
        KeyExpr::Const(s) => quote(s),
        KeyExpr::Concat(parts) => parts.iter().map(write_key).collect::<Vec<_>>().join(" + "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_conditions_of_real_policies() {
        assert_eq!(parse_key("context.Request.IpAddress"), Ok(KeyExpr::Ip));
        assert_eq!(
            parse_key("context.Request.Headers.GetValueOrDefault(\"Authorization\",\"\").AsJwt()?.Subject"),
            Ok(KeyExpr::Jwt { claim: "sub".into(), header: "Authorization".into(), default: String::new() })
        );
        assert_eq!(
            parse_key("context.Subscription.Id + \":\" + context.Product.Name"),
            Ok(KeyExpr::Concat(vec![KeyExpr::SubscriptionId, KeyExpr::Const(":".into()), KeyExpr::Product]))
        );
        let p = parse_condition("context.Response.StatusCode == 429 || context.Response.StatusCode >= 500").unwrap();
        assert_eq!(p.ranges(), &[(429, 429), (500, 599)]);
        let p = parse_condition("!(context.Response.StatusCode < 200) && 400 > context.Response.StatusCode").unwrap();
        assert_eq!(p.ranges(), &[(200, 399)]);
        let err = parse_key("context.Request.Url.Host").unwrap_err();
        assert!(
            err.message.contains("unsupported expression `context.Request.Url.Host`")
                && err.message.contains("supported key expressions")
        );
        assert!(parse_condition("context.Response.Body != null")
            .unwrap_err()
            .message
            .contains("unsupported condition"));
        assert!(parse_condition("context.Response.StatusCode ~ 5")
            .unwrap_err()
            .message
            .contains("expected a comparison"));
    }
}
