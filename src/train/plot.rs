//! Minimal loss-curve plotter that renders line/marker series to an RGB PNG.
//!
//! Everything (rasterisation, a 5x7 bitmap font, "nice" tick selection) is built
//! in, so the only dependency is the `png` crate. (Not `plotters`: its text
//! needs system fonts through fontconfig, or a font file we would ship, and
//! a training run must not fail on a machine without them.) Rendering never panics:
//! degenerate data (no points, NaN/inf, a single point, constant values) still
//! yields a valid image with axes and title, and unusable image sizes are
//! reported as [`io::ErrorKind::InvalidInput`].

use std::io::{self, Write};
use std::path::Path;

/// One line of the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text, e.g. `"train loss"` or `"eval loss"`.
    pub name: String,
    /// RGB color of the line/markers and of the legend swatch.
    pub color: [u8; 3],
    /// `(x, y)` points, typically `(optimizer step, loss)`; may be empty.
    /// Points with a non-finite coordinate are skipped.
    pub points: Vec<(f64, f64)>,
    /// `true`: draw a small filled square at each point (for sparse series such as
    /// per-epoch eval loss); `false`: connect the points with a polyline.
    pub markers: bool,
}

/// Smallest accepted width/height in pixels.
const MIN_DIM: u32 = 64;
/// Largest accepted width/height in pixels (keeps the pixel buffer bounded).
const MAX_DIM: u32 = 8192;
const GRID: [u8; 3] = [226, 226, 226];
const AXIS: [u8; 3] = [40, 40, 40];
const TEXT: [u8; 3] = [20, 20, 20];
const BORDER: [u8; 3] = [150, 150, 150];
const WHITE: [u8; 3] = [255, 255, 255];

/// Renders the plot (see [`render_png`]) and writes it to `path` atomically
/// (through [`crate::home::write_atomic`]).
///
/// # Errors
/// Errors of [`render_png`] (nothing is written then), and any I/O error from
/// writing or renaming.
pub fn write_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> io::Result<()> {
    let bytes = render_png(title, x_label, y_label, series, width, height)?;
    crate::home::write_atomic(path, |w| w.write_all(&bytes))
}

/// Renders a `width`x`height` RGB PNG with the series, axes, grid, tick labels,
/// title, axis labels and a legend, and returns the encoded bytes.
///
/// # Errors
/// [`io::ErrorKind::InvalidInput`] unless both dimensions are in `64..=8192`;
/// PNG encoding errors (not expected for an in-memory buffer) are passed on.
pub fn render_png(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> io::Result<Vec<u8>> {
    for (what, d) in [("width", width), ("height", height)] {
        if !(MIN_DIM..=MAX_DIM).contains(&d) {
            let msg = format!("plot {what} {d} is not in {MIN_DIM}..={MAX_DIM}");
            return Err(invalid(msg));
        }
    }
    let canvas = render([title, x_label, y_label], series, width, height);
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&canvas.px)?;
    writer.finish()?;
    Ok(out)
}

/// An [`io::ErrorKind::InvalidInput`] error with message `msg`.
fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Inclusive pixel rectangle `(x0, y0)..=(x1, y1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rect(i64, i64, i64, i64);

/// An RGB8 pixel buffer; every write is clipped to `clip` and the image bounds.
struct Canvas {
    w: i64,
    h: i64,
    px: Vec<u8>,
    clip: Rect,
}

impl Canvas {
    fn new(w: u32, h: u32) -> Self {
        let (w, h) = (i64::from(w), i64::from(h));
        let px = vec![255; usize::try_from(w * h * 3).unwrap_or(0)];
        let clip = Rect(0, 0, w - 1, h - 1);
        Canvas { w, h, px, clip }
    }

    /// Fills the `w`x`h` rectangle whose top-left corner is `(x, y)`.
    fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        let Rect(cx0, cy0, cx1, cy1) = self.clip;
        let (x0, x1) = (x.max(cx0).max(0), (x + w - 1).min(cx1).min(self.w - 1));
        let (y0, y1) = (y.max(cy0).max(0), (y + h - 1).min(cy1).min(self.h - 1));
        for yy in y0..=y1 {
            for xx in x0..=x1 {
                let i = usize::try_from((yy * self.w + xx) * 3).unwrap_or(usize::MAX);
                if let Some(p) = self.px.get_mut(i..i.saturating_add(3)) {
                    p.copy_from_slice(&c);
                }
            }
        }
    }

    /// Straight line from `(x0, y0)` to `(x1, y1)` (DDA with rounding), drawn with a
    /// `thick`x`thick` square brush.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thick: i64, c: [u8; 3]) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        let lerp = |a: i64, b: i64, i: i64| a + ((b - a) * i * 2 + n).div_euclid(2 * n);
        let off = (thick - 1) / 2;
        for i in 0..=n {
            let (x, y) = (lerp(x0, x1, i), lerp(y0, y1, i));
            self.fill(x - off, y - off, thick, thick, c);
        }
    }

    /// Draws `text` at scale `s` with its top-left corner at `(x, y)`; if
    /// `vertical`, the text is rotated 90° counter-clockwise and `(x, y)` is its
    /// bottom-left corner.
    fn text(&mut self, (x, y): (i64, i64), text: &str, s: i64, vertical: bool) {
        for (i, ch) in (0i64..).zip(text.chars()) {
            let base = i * 6;
            if (vertical && y - base * s < 0) || (!vertical && x + base * s >= self.w) {
                break;
            }
            let bits = glyph(ch);
            for (gy, gx) in (0..7).flat_map(|r| (0..5).map(move |c| (r, c))) {
                if (bits >> (8 * (6 - gy) + 4 - gx)) & 1 == 1 {
                    let (px, py) = if vertical {
                        (x + gy * s, y - (base + gx + 1) * s + 1)
                    } else {
                        (x + (base + gx) * s, y + gy * s)
                    };
                    self.fill(px, py, s, s, TEXT);
                }
            }
        }
    }
}

/// Width in pixels of `text` drawn at scale `s` (6 px advance per glyph).
fn text_width(text: &str, s: i64) -> i64 {
    let n = i64::try_from(text.chars().count()).unwrap_or(i64::MAX / 64);
    (n.min(1 << 40) * 6 * s - s).max(0)
}

/// Data range and labelled ticks of one axis.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<(f64, String)>,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, target: f64, integer: bool) -> Self {
        let (lo, hi) = data_range(values);
        let (ticks, step) = nice_ticks(lo, hi, target, integer);
        let sci = !(1e-3..1e6).contains(&lo.abs().max(hi.abs()));
        let ticks = ticks
            .into_iter()
            .map(|t| (t, fmt_tick(t, step, sci)))
            .collect();
        Axis { lo, hi, ticks }
    }

    /// Maps `v` linearly from `lo..hi` onto pixels `p0..p1` (halved to avoid overflow).
    fn map(&self, v: f64, p0: i64, p1: i64) -> Option<i64> {
        let t = (v * 0.5 - self.lo * 0.5) / (self.hi * 0.5 - self.lo * 0.5);
        let f = p0 as f64 + t * (p1 - p0) as f64;
        f.is_finite().then(|| f.round().clamp(-1e6, 1e6) as i64)
    }
}

/// Min..max of the finite `values` padded by 5% on each side; constant data is
/// expanded by 10% (or ±1 around zero) and no data gives `0..1`. Always finite.
fn data_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        (lo, hi) = (lo.min(v), hi.max(v));
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    let half_span = hi * 0.5 - lo * 0.5;
    let pad = if half_span > lo.abs().max(hi.abs()) * 1e-12 {
        half_span * 0.1
    } else if lo.abs() > 1e-12 {
        lo.abs() * 0.1
    } else {
        1.0
    };
    ((lo - pad).max(f64::MIN), (hi + pad).min(f64::MAX))
}

/// Ticks at multiples of a 1/2/5 x 10^k step (at least 1 if `integer`) giving
/// roughly `target` ticks in `lo..=hi`; returns the ticks and the step.
fn nice_ticks(lo: f64, hi: f64, target: f64, integer: bool) -> (Vec<f64>, f64) {
    let raw = (hi * 0.5 - lo * 0.5) / target * 2.0;
    if !(raw.is_finite() && raw > 0.0) {
        return (Vec::new(), 1.0);
    }
    let mag = 10f64.powf(raw.log10().floor());
    let nice = match raw / mag {
        n if n < 1.5 => 1.0,
        n if n < 3.5 => 2.0,
        n if n < 7.5 => 5.0,
        _ => 10.0,
    };
    let step = (nice * mag).max(if integer { 1.0 } else { 0.0 });
    if !(step.is_finite() && step > 0.0) {
        return (Vec::new(), 1.0);
    }
    let first = (lo / step).ceil() * step;
    let mut ticks = Vec::new();
    for t in (0..=50).map(|i| first + f64::from(i) * step) {
        if t > hi + step * 1e-9 {
            break;
        }
        ticks.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
    }
    (ticks, step)
}

/// Compact tick label: just enough decimals to resolve `step` (integers when
/// `step >= 1`), or with `sci` (axes whose magnitude is outside `1e-3..1e6`)
/// 3 significant digits in exponent form, e.g. `1.5e-4`.
fn fmt_tick(v: f64, step: f64, sci: bool) -> String {
    // Rounding via a formatted string, then printing the re-parsed value, gives
    // the shortest form ("1.50" -> "1.5", "2.00e6" -> "2e6").
    if v.abs() < step * 1e-6 {
        "0".to_string()
    } else if !sci {
        let decimals = (-step.log10() - 1e-9).ceil().clamp(0.0, 9.0) as usize;
        format!("{v:.decimals$}").parse().unwrap_or(v).to_string()
    } else {
        format!("{:e}", format!("{v:.2e}").parse().unwrap_or(v))
    }
}

/// Geometry of the plot: glyph scale, plot area, legend box and both axes.
struct Layout {
    s: i64,
    plot: Rect,
    legend: Option<Rect>,
    x: Axis,
    y: Axis,
}

/// Computes the glyph scale, axis ranges/ticks, plot area and legend box.
fn layout(series: &[Series], width: u32, height: u32) -> Layout {
    let (w, h) = (i64::from(width), i64::from(height));
    let s = if w >= 480 && h >= 300 { 2 } else { 1 };
    let (pad, tick, gh) = (4 * s, 3 * s, 7 * s);
    let pts = || series.iter().flat_map(|se| se.points.iter());
    let finite = || pts().filter(|(x, y)| x.is_finite() && y.is_finite());
    let x_target = (w as f64 / 140.0).clamp(2.0, 8.0);
    let x = Axis::new(finite().map(|p| p.0), x_target, true);
    let y_target = (h as f64 / 90.0).clamp(2.0, 8.0);
    let y = Axis::new(finite().map(|p| p.1), y_target, false);
    let y_label_w = y.ticks.iter().map(|t| text_width(&t.1, s)).max();
    let y_label_w = y_label_w.unwrap_or(0);
    let (left, top) = (4 * pad + gh + y_label_w + tick + s, 3 * pad + gh);
    let (right, bottom) = (2 * pad + 18 * s, s + tick + 3 * pad + 2 * gh);
    let (x1, y1) = ((w - 1 - right).max(left + 1), (h - 1 - bottom).max(top + 1));
    let legend = (!series.is_empty()).then(|| {
        let name_w = series.iter().map(|se| text_width(&se.name, s)).max();
        let n = i64::try_from(series.len()).unwrap_or(1000).min(1000);
        let lx0 = x1 - 4 * pad - gh - name_w.unwrap_or(0) + 1;
        Rect(lx0, top + pad, x1 - pad, top + 2 * pad + n * (gh + pad) - 1)
    });
    let plot = Rect(left, top, x1, y1);
    Layout {
        s,
        plot,
        legend,
        x,
        y,
    }
}

/// Rasterises the whole plot; `labels` are the title, x label and y label.
fn render(labels: [&str; 3], series: &[Series], width: u32, height: u32) -> Canvas {
    let [title, x_label, y_label] = labels;
    let lay = layout(series, width, height);
    let (s, plot, x, y) = (lay.s, lay.plot, &lay.x, &lay.y);
    let Rect(x0, y0, x1, y1) = plot;
    let (pad, tick, gh) = (4 * s, 3 * s, 7 * s);
    let mut c = Canvas::new(width, height);

    // Grid lines, tick marks and tick labels at the tick positions, then the axes.
    for (v, label) in &x.ticks {
        let Some(px) = x.map(*v, x0, x1) else {
            continue;
        };
        c.fill(px, y0, 1, y1 - y0, GRID);
        c.fill(px, y1 + s, 1, tick, AXIS);
        let lx = px - text_width(label, s) / 2;
        c.text((lx, y1 + s + tick + pad), label, s, false);
    }
    for (v, label) in &y.ticks {
        let Some(py) = y.map(*v, y1, y0) else {
            continue;
        };
        c.fill(x0 + 1, py, x1 - x0, 1, GRID);
        c.fill(x0 - s - tick + 1, py, tick, 1, AXIS);
        let lx = x0 - s - tick - pad - text_width(label, s) + 1;
        c.text((lx, py - gh / 2), label, s, false);
    }
    c.fill(x0 - s + 1, y0, s, y1 - y0 + 1, AXIS);
    c.fill(x0 - s + 1, y1, x1 - x0 + s, s, AXIS);

    // Data, clipped to the inside of the axes.
    c.clip = Rect(x0 + 1, y0, x1, y1 - 1);
    for se in series {
        let mut pts = Vec::with_capacity(se.points.len());
        for &(a, b) in &se.points {
            if let (Some(px), Some(py)) = (x.map(a, x0, x1), y.map(b, y1, y0)) {
                pts.push((px, py));
            }
        }
        if se.markers {
            let m = 3 * s + 1;
            for &(px, py) in &pts {
                c.fill(px - m / 2, py - m / 2, m, m, se.color);
            }
        } else if let [only] = pts[..] {
            c.line(only, only, s + 1, se.color);
        } else {
            for (a, b) in pts.iter().zip(pts.iter().skip(1)) {
                c.line(*a, *b, s, se.color);
            }
        }
    }
    c.clip = Rect(0, 0, c.w - 1, c.h - 1);

    // Title and axis labels (the y label reads bottom to top).
    c.text(((c.w - text_width(title, s)) / 2, 2 * pad), title, s, false);
    let xl = (x0 + x1 - text_width(x_label, s)) / 2;
    c.text((xl, y1 + s + tick + 2 * pad + gh), x_label, s, false);
    let yl = (y0 + y1 + text_width(y_label, s)) / 2;
    c.text((2 * pad, yl), y_label, s, true);

    // Legend box in the upper-right corner of the plot area.
    if let Some(Rect(lx0, ly0, lx1, ly1)) = lay.legend {
        c.fill(lx0, ly0, lx1 - lx0 + 1, ly1 - ly0 + 1, BORDER);
        c.fill(lx0 + 1, ly0 + 1, lx1 - lx0 - 1, ly1 - ly0 - 1, WHITE);
        for (i, se) in (0i64..).zip(series).take(1000) {
            let ey = ly0 + pad + i * (gh + pad);
            c.fill(lx0 + pad, ey, gh, gh, se.color);
            c.text((lx0 + 2 * pad + gh, ey), &se.name, s, false);
        }
    }
    c
}

/// Characters covered by the built-in font, in the order of [`GLYPHS`].
const CHARSET: &str = "0123456789.-+()/:_%abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,=";

/// 5x7 glyph bitmaps: byte 6 (most significant) is the top row, byte 0 the bottom
/// row; within a row, bit 4 is the leftmost column. Same order as [`CHARSET`].
#[rustfmt::skip]
const GLYPHS: [u64; 73] = [
    0x0E11131519110E, 0x040C040404040E, 0x0E11010204081F, 0x1F02040201110E, 0x02060A121F0202,
    0x1F101E0101110E, 0x0608101E11110E, 0x1F010204080808, 0x0E11110E11110E, 0x0E11110F01020C,
    0x00000000000C0C, 0x0000001F000000, 0x0004041F040400, 0x02040808080402, 0x08040202020408,
    0x00010204081000, 0x000C0C000C0C00, 0x0000000000001F, 0x18190204081303, 0x00000E010F110F,
    0x1010161911111E, 0x00000E1010110E, 0x01010D1311110F, 0x00000E111F100E, 0x0609081C080808,
    0x000F11110F010E, 0x10101619111111, 0x04000C0404040E, 0x0200060202120C, 0x10101214181412,
    0x0C04040404040E, 0x00001A15151111, 0x00001619111111, 0x00000E1111110E, 0x00001E111E1010,
    0x00000D130F0101, 0x00001619101010, 0x00000E100E011E, 0x08081C08080906, 0x0000111111130D,
    0x00001111110A04, 0x0000111115150A, 0x0000110A040A11, 0x000011110F010E, 0x00001F0204081F,
    0x0E1111111F1111, 0x1E11111E11111E, 0x0E11101010110E, 0x1C12111111121C, 0x1F10101E10101F,
    0x1F10101E101010, 0x0E11101711110F, 0x1111111F111111, 0x0E04040404040E, 0x0702020202120C,
    0x11121418141211, 0x1010101010101F, 0x111B1515111111, 0x11111915131111, 0x0E11111111110E,
    0x1E11111E101010, 0x0E11111115120D, 0x1E11111E141211, 0x0F10100E01011E, 0x1F040404040404,
    0x1111111111110E, 0x11111111110A04, 0x1111111515150A, 0x11110A040A1111, 0x1111110A040404,
    0x1F01020408101F, 0x000000000C0408, 0x00001F001F0000,
];

/// Bitmap of `ch` (see [`GLYPHS`]); unknown characters, including space, are blank.
fn glyph(ch: char) -> u64 {
    let index = CHARSET.chars().position(|g| g == ch);
    index.and_then(|i| GLYPHS.get(i).copied()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
        let info = reader.next_frame(&mut buf).expect("png frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    /// Whether the 800 px wide `img` has a pixel of `color` inside `r` but outside `not`.
    fn has_color(img: &[u8], r: Rect, not: Option<Rect>, color: [u8; 3]) -> bool {
        let inside = |r: Rect, x, y| (r.0..=r.2).contains(&x) && (r.1..=r.3).contains(&y);
        img.chunks_exact(3).zip(0i64..).any(|(px, i)| {
            let (x, y) = (i % 800, i / 800);
            px == color && inside(r, x, y) && !not.is_some_and(|n| inside(n, x, y))
        })
    }

    fn series(name: &str, color: [u8; 3], points: &[(f64, f64)], markers: bool) -> Series {
        let (name, points) = (name.to_string(), points.to_vec());
        Series {
            name,
            color,
            points,
            markers,
        }
    }

    #[test]
    fn renders_series_grid_and_legend() {
        let train: Vec<_> = (1..200).map(f64::from).map(|x| (x, 9.0 / x)).collect();
        let eval = [(50.0, 1.2), (100.0, 0.8), (150.0, 0.6), (f64::NAN, 1.0)];
        let all = [
            series("train loss", [200, 30, 30], &train, false),
            series("eval loss", [30, 30, 200], &eval, true),
            series("Unused: (none) 5%_/+", [20, 160, 20], &[], false),
        ];
        let bytes = render_png("Loss", "step", "loss", &all, 800, 500).expect("render");
        let (w, h, img) = decode(&bytes);
        assert_eq!((w, h), (800, 500));
        let lay = layout(&all, w, h);
        let (key, plot) = (lay.legend.expect("legend"), lay.plot);
        assert!(key.2 <= plot.2 && key.1 >= plot.1, "legend in plot");
        for (i, se) in all.iter().enumerate() {
            let in_plot = has_color(&img, plot, Some(key), se.color);
            assert_eq!(in_plot, i < 2, "data of {}", se.name);
            assert!(has_color(&img, key, None, se.color), "{}", se.name);
        }
        assert!(has_color(&img, plot, None, GRID), "grid");
        assert!(has_color(&img, key, None, TEXT), "legend text");
    }

    #[test]
    fn degenerate_inputs_render() {
        let (nan, inf, max) = (f64::NAN, f64::INFINITY, f64::MAX);
        let cases: [&[(f64, f64)]; 6] = [
            &[],
            &[(nan, 1.0), (1.0, inf), (-inf, nan)],
            &[(7.0, 0.5)],
            &[(0.0, 0.0), (10.0, 0.0)],
            &[(-max, max), (max, -max), (0.0, 0.0)],
            &[(1.0, 1e-300), (1.0, 2e-300)],
        ];
        for (i, points) in cases.into_iter().enumerate() {
            let s = [series("s", [200, 0, 0], points, i % 2 == 1)];
            for (w, h) in [(64, 64), (300, 90)] {
                let bytes = render_png("t\u{e9}st ~", "x", "y", &s, w, h).expect("render");
                assert_eq!(decode(&bytes).0, w, "case {i}");
            }
            let (_, _, img) = decode(&render_png("t", "", "", &s, 800, 500).expect("render"));
            let lay = layout(&s, 800, 500);
            let drawn = has_color(&img, lay.plot, lay.legend, [200, 0, 0]);
            assert_eq!(drawn, i > 1, "case {i}");
        }
        assert!(render_png("no series", "x", "y", &[], 800, 500).is_ok());
    }

    #[test]
    fn invalid_sizes_error() {
        for (w, h) in [(0, 0), (63, 500), (800, 63), (800, 0), (MAX_DIM + 1, 100)] {
            let err = render_png("t", "x", "y", &[], w, h).expect_err("size must be rejected");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn ticks_labels_and_ranges() {
        let (ticks, step) = nice_ticks(0.0, 10.0, 5.0, false);
        assert_eq!((ticks, step), (vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0], 2.0));
        assert_eq!(nice_ticks(4.5, 5.5, 5.0, true), (vec![5.0], 1.0));
        assert!(nice_ticks(0.0, f64::INFINITY, 5.0, false).0.is_empty());
        assert_eq!(fmt_tick(1500.0, 500.0, false), "1500");
        assert_eq!(fmt_tick(0.25, 0.05, false), "0.25");
        assert_eq!(fmt_tick(1.0, 0.5, false), "1");
        assert_eq!(fmt_tick(-1e-16, 0.1, true), "0");
        assert_eq!(fmt_tick(2e6, 1e6, true), "2e6");
        assert_eq!(fmt_tick(1.5e-4, 5e-5, true), "1.5e-4");
        assert_eq!(fmt_tick(8e-4, 2e-4, false), "0.0008");
        assert_eq!(fmt_tick(-1.23456e7, 1e5, true), "-1.23e7");
        assert_eq!(data_range([].into_iter()), (0.0, 1.0));
        assert_eq!(data_range([2.0, 2.0, f64::NAN].into_iter()), (1.8, 2.2));
        assert_eq!(data_range([0.0, 10.0].into_iter()), (-0.5, 10.5));
    }

    #[test]
    fn write_png_replaces_file_atomically() {
        let dir = std::env::temp_dir().join(format!("svfit_plot_{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let (path, s) = (dir.join("loss.png"), [series("a", [9, 9, 9], &[], true)]);
        for height in [80, 90] {
            write_png(&path, "t", "x", "y", &s, 120, height).expect("write");
            assert_eq!(decode(&fs::read(&path).expect("read")).1, height);
        }
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("loss.png")],
            "no temporary file left"
        );
        assert!(write_png(&dir.join("x.png"), "t", "x", "y", &s, 10, 10).is_err());
        assert!(!dir.join("x.png").exists());
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
