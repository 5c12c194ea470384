//! Small hand-written SVG charts: enough to read a comparison at a glance, no plotting crate.

use std::fmt::Write;

pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 760.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Round tick values covering `lo..hi`.
/// Horizontal grid lines with their labels, from 0 to `y1`, ending at `right`.
fn y_grid(svg: &mut String, y1: f64, right: f64, py: &dyn Fn(f64) -> f64) {
    for y in ticks(0.0, y1) {
        let _ = writeln!(
            svg,
            r##"<line x1="{0}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="#ddd"/><text x="{3}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            LEFT,
            py(y),
            right,
            LEFT - 6.0,
            py(y) + 4.0,
            label(y)
        );
    }
}

fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-6 {
        out.push(t);
        t += step;
    }
    out
}

fn label(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn frame(svg: &mut String, title: &str, x_label: &str, y_label: &str) {
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>
"##,
        (LEFT + W - RIGHT) / 2.0,
        escape(title),
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0,
        escape(x_label),
        (TOP + H - BOTTOM) / 2.0,
        escape(y_label),
    );
}

/// Lines over a shared x axis, optionally logarithmic, with a legend on the right.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> String {
    let tx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in pts() {
        x0 = x0.min(tx(x));
        x1 = x1.max(tx(x));
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if log_x {
        (x0, x1) = (x0.floor(), x1.ceil().max(x0.floor() + 1.0));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.05 } else { 1.0 };
    let px = |x: f64| LEFT + (tx(x) - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / y1 * (H - TOP - BOTTOM);

    let mut svg = String::new();
    frame(&mut svg, title, x_label, y_label);
    let xt: Vec<f64> = if log_x {
        (x0 as i32..=x1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        ticks(x0, x1)
    };
    for x in xt {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#ddd"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
            px(x),
            TOP,
            H - BOTTOM,
            H - BOTTOM + 16.0,
            label(x)
        );
    }
    y_grid(&mut svg, y1, W - RIGHT, &py);
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    for (k, s) in series.iter().enumerate() {
        let dash = if s.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
            s.color,
            path.join(" ")
        );
        let ly = TOP + 10.0 + 20.0 * k as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{3}" stroke-width="2"{dash}/><text x="{4}" y="{5}">{6}</text>"#,
            W - RIGHT + 12.0,
            ly,
            W - RIGHT + 40.0,
            s.color,
            W - RIGHT + 46.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// One bar per entry, value printed on top.
pub fn bar_chart(title: &str, y_label: &str, bars: &[(String, f64, &'static str)]) -> String {
    let y1 = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    let y1 = if y1 > 0.0 { y1 * 1.15 } else { 1.0 };
    let inner = W - LEFT - 40.0;
    let slot = inner / bars.len().max(1) as f64;
    let py = |y: f64| H - BOTTOM - y / y1 * (H - TOP - BOTTOM);
    let mut svg = String::new();
    frame(&mut svg, title, "", y_label);
    y_grid(&mut svg, y1, LEFT + inner, &py);
    for (k, (name, v, color)) in bars.iter().enumerate() {
        let x = LEFT + slot * k as f64 + slot * 0.15;
        // Long names go on two lines, split after a '+', so neighbours do not overlap.
        let (first, second) = match name.split_once('+') {
            Some((a, b)) => (a.to_string(), format!("+{b}")),
            None => (name.clone(), String::new()),
        };
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{:.1}" y="{}" text-anchor="middle" font-size="11">{}</text><text x="{:.1}" y="{}" text-anchor="middle" font-size="11">{}</text>"#,
            py(*v),
            slot * 0.7,
            (H - BOTTOM) - py(*v),
            x + slot * 0.35,
            py(*v) - 4.0,
            if v.abs() < 10.0 {
                format!("{v:.2}")
            } else {
                label(*v)
            },
            x + slot * 0.35,
            H - BOTTOM + 14.0,
            escape(&first),
            x + slot * 0.35,
            H - BOTTOM + 27.0,
            escape(&second)
        );
    }
    svg.push_str("</svg>\n");
    svg
}
