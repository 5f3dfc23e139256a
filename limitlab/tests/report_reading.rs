//! A report a reader can act on: a verdict at the top that says which limit
//! refused whom and gives a sweep command that runs, captions that say what a
//! plot means rather than repeating its title, and a guide to the figures.

mod common;

use common::limitlab;

/// Splits a command line on spaces, keeping "double-quoted" arguments whole.
fn words(command: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted) = (Vec::new(), String::new(), false);
    for c in command.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => words.extend((!word.is_empty()).then(|| std::mem::take(&mut word))),
            c => word.push(c),
        }
    }
    words.extend((!word.is_empty()).then_some(word));
    words
}

#[test]
fn the_verdict_names_the_limit_and_its_sweep_command_runs() {
    let dir = std::env::temp_dir().join(format!("limitlab-verdict-{}", std::process::id()));
    let (code, stdout, err) = limitlab(&["simulate", "scenarios/seed-ip-limits.toml", "--out", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let verdict: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("verdict: ")).collect();
    let power = verdict.iter().find(|l| l.starts_with("power-user:")).expect("a verdict on the power user");
    assert!(power.contains("mostly rate-limit"), "{power}");
    let command = power.split("size it with: ").nth(1).expect("a command");
    let args = words(command);
    assert_eq!(args[0], "limitlab");
    assert!(args.contains(&"gateway.policy.rate_limit.calls=10,20,40,80".to_owned()), "{args:?}");
    let out = dir.join("sweep");
    let mut run: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    run.extend(["--seeds", "1", "--out", out.to_str().unwrap()]);
    let (code, stdout, err) = limitlab(&run);
    assert_eq!(code, 0, "the suggested command runs: {run:?}\n{err}");
    assert!(stdout.contains("SLO pass"), "{stdout}");
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("<h2>Verdict</h2>") && html.contains("power-user: 94%"), "the HTML has the verdict");
    assert!(html.contains("How to read this report"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_caption_repeats_its_plots_title() {
    let dir = std::env::temp_dir().join(format!("limitlab-captions-{}", std::process::id()));
    let (code, _, err) = limitlab(&["simulate", "scenarios/primary-outage.toml", "--out", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    let captions: Vec<&str> =
        html.split("<figcaption>").skip(1).map(|c| c.split("</figcaption>").next().unwrap()).collect();
    assert_eq!(captions.len(), 5);
    for figure in html.split("<figure>").skip(1) {
        let caption = figure.split("<figcaption>").nth(1).unwrap().split("</figcaption>").next().unwrap();
        // The plot's title is drawn as SVG text inside the figure.
        let texts: Vec<&str> =
            figure.split("<text").skip(1).filter_map(|t| t.split('>').nth(1)?.split('<').next()).collect();
        assert!(
            !texts.iter().any(|t| !t.is_empty() && caption.starts_with(t) && t.len() > 12),
            "{caption} repeats {texts:?}"
        );
        assert!(caption.len() > 60, "a caption that explains: {caption}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
