//! The loss-curve plot as SVG: line or marker series, axes with "nice"
//! ticks, a grid, a title, axis labels and a legend.
//!
//! SVG is plain text, so no dependency and no font is needed: the viewer
//! draws the text. Rendering never panics: degenerate data (no points,
//! NaN/inf, a single point, constant values) still yields a valid image
//! with axes and title, every label is escaped, and unusable image sizes
//! are reported as [`io::ErrorKind::InvalidInput`].

use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
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
/// Largest accepted width/height in pixels.
const MAX_DIM: u32 = 8192;
const GRID: &str = "#e2e2e2";
const AXIS: &str = "#282828";
const TEXT: &str = "#141414";
const BORDER: &str = "#969696";

/// What a plot shows and its size in pixels.
pub struct Plot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    pub width: u32,
    pub height: u32,
}

impl Plot<'_> {
    /// Renders the plot (see [`Plot::render`]) and writes it to `path`
    /// atomically (through [`crate::home::write_atomic`]).
    ///
    /// # Errors
    /// Errors of [`Plot::render`] (nothing is written then), and any I/O
    /// error from writing or renaming.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let svg = self.render()?;
        crate::home::write_atomic(path, |w| w.write_all(svg.as_bytes()))
    }

    /// The SVG: the series, axes, grid, tick labels, title, axis labels
    /// and a legend.
    ///
    /// # Errors
    /// [`io::ErrorKind::InvalidInput`] unless both dimensions are in `64..=8192`.
    pub fn render(&self) -> io::Result<String> {
        let (width, height) = (self.width, self.height);
        for (what, d) in [("width", width), ("height", height)] {
            if !(MIN_DIM..=MAX_DIM).contains(&d) {
                let msg = format!("plot {what} {d} is not in {MIN_DIM}..={MAX_DIM}");
                return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
            }
        }
        let lay = layout(self.series, width, height);
        let mut svg = Svg(String::new());
        svg.open(&lay, width, height);
        svg.axes(&lay);
        svg.series(&lay, self.series);
        svg.labels(&lay, [self.title, self.x_label, self.y_label]);
        svg.legend(&lay, self.series);
        svg.0.push_str("</svg>\n");
        Ok(svg.0)
    }
}

/// Rectangle `(x0, y0)..(x1, y1)` in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rect(f64, f64, f64, f64);

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

    /// Maps `v` linearly from `lo..hi` onto pixels `p0..p1` (halved to avoid
    /// overflow); `None` if that is not a finite number.
    fn map(&self, v: f64, p0: f64, p1: f64) -> Option<f64> {
        let t = (v * 0.5 - self.lo * 0.5) / (self.hi * 0.5 - self.lo * 0.5);
        let f = p0 + t * (p1 - p0);
        f.is_finite().then(|| f.clamp(-1e6, 1e6))
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

/// Geometry of the plot: font size, plot area, legend box and both axes.
struct Layout {
    /// Font size in pixels; the other sizes follow it.
    font: f64,
    plot: Rect,
    legend: Option<Rect>,
    x: Axis,
    y: Axis,
}

impl Layout {
    /// Padding between elements.
    fn pad(&self) -> f64 {
        spacing(self.font)
    }

    /// Length of a tick mark.
    fn tick(&self) -> f64 {
        spacing(self.font)
    }
}

/// The padding and tick length for font size `font`.
fn spacing(font: f64) -> f64 {
    (font * 0.4).round()
}

/// Estimated width in pixels of `text` at font size `font` (0.6 em a
/// character, generous for a sans-serif face).
fn text_width(text: &str, font: f64) -> f64 {
    text.chars().count().min(1 << 20) as f64 * 0.6 * font
}

/// Computes the font size, axis ranges/ticks, plot area and legend box.
fn layout(series: &[Series], width: u32, height: u32) -> Layout {
    let (w, h) = (f64::from(width), f64::from(height));
    let font: f64 = if w >= 480.0 && h >= 300.0 { 14.0 } else { 9.0 };
    let (pad, tick) = (spacing(font), spacing(font));
    let pts = || series.iter().flat_map(|se| se.points.iter());
    let finite = || pts().filter(|(x, y)| x.is_finite() && y.is_finite());
    let x = Axis::new(finite().map(|p| p.0), (w / 140.0).clamp(2.0, 8.0), true);
    let y = Axis::new(finite().map(|p| p.1), (h / 90.0).clamp(2.0, 8.0), false);
    let y_label_w = y.ticks.iter().map(|t| text_width(&t.1, font));
    let y_label_w = y_label_w.fold(0.0, f64::max);
    let (left, top) = (3.0 * pad + font + y_label_w + tick, 3.0 * pad + font);
    let (right, bottom) = (3.0 * pad, tick + 3.0 * pad + 2.0 * font);
    let (x1, y1) = ((w - right).max(left + 1.0), (h - bottom).max(top + 1.0));
    let legend = (!series.is_empty()).then(|| {
        let name_w = series.iter().map(|se| text_width(&se.name, font));
        let n = series.len().min(1000) as f64;
        let lx0 = x1 - 4.0 * pad - font - name_w.fold(0.0, f64::max);
        Rect(lx0, top + pad, x1 - pad, top + 2.0 * pad + n * (font + pad))
    });
    let plot = Rect(left, top, x1, y1);
    Layout {
        font,
        plot,
        legend,
        x,
        y,
    }
}

/// `color` as `#rrggbb`.
struct Color([u8; 3]);

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [r, g, b] = self.0;
        write!(f, "#{r:02x}{g:02x}{b:02x}")
    }
}

/// `text` escaped for XML text and attribute values; control characters
/// (which XML 1.0 does not allow) become spaces.
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&apos;")?,
                c if c.is_control() => f.write_char(' ')?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// The document being written. Writing to a `String` cannot fail, so the
/// results of `write!` are dropped.
struct Svg(String);

impl Svg {
    /// Appends formatted text.
    fn put(&mut self, args: fmt::Arguments<'_>) {
        let _ = self.0.write_fmt(args);
    }

    /// The `<svg>` element, a white background and the plot area's clip path.
    fn open(&mut self, lay: &Layout, width: u32, height: u32) {
        let Rect(x0, y0, x1, y1) = lay.plot;
        self.put(format_args!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
             viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"{}\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n\
             <defs><clipPath id=\"plot-area\"><rect x=\"{x0:.1}\" y=\"{y0:.1}\" \
             width=\"{:.1}\" height=\"{:.1}\"/></clipPath></defs>\n",
            lay.font,
            x1 - x0,
            y1 - y0,
        ));
    }

    /// Grid lines, tick marks and tick labels at the tick positions, then
    /// the axes.
    fn axes(&mut self, lay: &Layout) {
        let Rect(x0, y0, x1, y1) = lay.plot;
        let (pad, tick, font) = (lay.pad(), lay.tick(), lay.font);
        let xs = lay.x.ticks.iter();
        let xs: Vec<_> = xs
            .filter_map(|(v, l)| Some((lay.x.map(*v, x0, x1)?, l)))
            .collect();
        let ys = lay.y.ticks.iter();
        let ys: Vec<_> = ys
            .filter_map(|(v, l)| Some((lay.y.map(*v, y1, y0)?, l)))
            .collect();
        self.put(format_args!("<g class=\"grid\" stroke=\"{GRID}\">\n"));
        for (px, _) in &xs {
            self.line((*px, y0), (*px, y1));
        }
        for (py, _) in &ys {
            self.line((x0, *py), (x1, *py));
        }
        self.put(format_args!("</g>\n<g class=\"axes\" stroke=\"{AXIS}\">\n"));
        for (px, _) in &xs {
            self.line((*px, y1), (*px, y1 + tick));
        }
        for (py, _) in &ys {
            self.line((x0 - tick, *py), (x0, *py));
        }
        self.line((x0, y0), (x0, y1));
        self.line((x0, y1), (x1, y1));
        self.put(format_args!("</g>\n<g class=\"ticks\" fill=\"{TEXT}\">\n"));
        for (px, label) in &xs {
            let at = (*px, y1 + tick + pad + font);
            self.text(at, "middle", label, "");
        }
        for (py, label) in &ys {
            let at = (x0 - tick - pad, py + font * 0.35);
            self.text(at, "end", label, "");
        }
        self.0.push_str("</g>\n");
    }

    /// Each series, clipped to the plot area: a polyline (a dot when it has
    /// one point) or a square marker per point.
    fn series(&mut self, lay: &Layout, series: &[Series]) {
        let Rect(x0, y0, x1, y1) = lay.plot;
        self.0.push_str("<g clip-path=\"url(#plot-area)\">\n");
        for se in series {
            let color = Color(se.color);
            let pts = se.points.iter();
            let pts =
                pts.filter_map(|&(a, b)| Some((lay.x.map(a, x0, x1)?, lay.y.map(b, y1, y0)?)));
            let pts: Vec<_> = pts.collect();
            let name = Escaped(&se.name);
            self.put(format_args!(
                "<g class=\"series\" data-name=\"{name}\" fill=\"{color}\">\n"
            ));
            let stroke = lay.font / 7.0;
            if se.markers {
                let m = stroke * 3.5;
                for (px, py) in &pts {
                    self.put(format_args!(
                        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{m:.1}\" height=\"{m:.1}\"/>\n",
                        px - m / 2.0,
                        py - m / 2.0
                    ));
                }
            } else if let [(px, py)] = pts[..] {
                let r = stroke;
                self.put(format_args!(
                    "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"{r:.1}\"/>\n"
                ));
            } else if !pts.is_empty() {
                self.put(format_args!(
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"{stroke:.1}\" \
                     stroke-linejoin=\"round\" points=\""
                ));
                for (i, (px, py)) in pts.iter().enumerate() {
                    let sep = if i == 0 { "" } else { " " };
                    self.put(format_args!("{sep}{px:.1},{py:.1}"));
                }
                self.0.push_str("\"/>\n");
            }
            self.0.push_str("</g>\n");
        }
        self.0.push_str("</g>\n");
    }

    /// The title and both axis labels (the y label reads bottom to top).
    fn labels(&mut self, lay: &Layout, [title, x_label, y_label]: [&str; 3]) {
        let Rect(x0, y0, x1, y1) = lay.plot;
        let (pad, font) = (lay.pad(), lay.font);
        self.put(format_args!("<g class=\"labels\" fill=\"{TEXT}\">\n"));
        let width = x1 + 3.0 * pad;
        self.text((width / 2.0, 2.0 * pad + font), "middle", title, "");
        let at = ((x0 + x1) / 2.0, y1 + lay.tick() + 2.0 * pad + 2.0 * font);
        self.text(at, "middle", x_label, "");
        let (x, y) = (2.0 * pad + font * 0.8, (y0 + y1) / 2.0);
        let turn = format!(" transform=\"rotate(-90 {x:.1} {y:.1})\"");
        self.text((x, y), "middle", y_label, &turn);
        self.0.push_str("</g>\n");
    }

    /// The legend box in the upper-right corner of the plot area: a swatch
    /// and the name of each series.
    fn legend(&mut self, lay: &Layout, series: &[Series]) {
        let Some(Rect(lx0, ly0, lx1, ly1)) = lay.legend else {
            return;
        };
        let (pad, font) = (lay.pad(), lay.font);
        self.put(format_args!(
            "<g class=\"legend\" fill=\"{TEXT}\">\n<rect x=\"{lx0:.1}\" y=\"{ly0:.1}\" width=\"{:.1}\" \
             height=\"{:.1}\" fill=\"#ffffff\" stroke=\"{BORDER}\"/>\n",
            lx1 - lx0,
            ly1 - ly0
        ));
        for (i, se) in series.iter().enumerate().take(1000) {
            let ey = ly0 + pad + i as f64 * (font + pad);
            self.put(format_args!(
                "<rect x=\"{:.1}\" y=\"{ey:.1}\" width=\"{font:.1}\" height=\"{font:.1}\" \
                 fill=\"{}\"/>\n",
                lx0 + pad,
                Color(se.color)
            ));
            let at = (lx0 + 2.0 * pad + font, ey + font * 0.85);
            self.text(at, "start", &se.name, "");
        }
        self.0.push_str("</g>\n");
    }

    /// A line from `a` to `b` in the enclosing group's stroke.
    fn line(&mut self, (xa, ya): (f64, f64), (xb, yb): (f64, f64)) {
        self.put(format_args!(
            "<line x1=\"{xa:.1}\" y1=\"{ya:.1}\" x2=\"{xb:.1}\" y2=\"{yb:.1}\"/>\n"
        ));
    }

    /// `text` escaped, anchored at `(x, y)` (its baseline) by `anchor`
    /// (`start`, `middle` or `end`), with `extra` attributes.
    fn text(&mut self, (x, y): (f64, f64), anchor: &str, text: &str, extra: &str) {
        self.put(format_args!(
            "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\"{extra}>{}</text>\n",
            Escaped(text)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// The element names of `svg` in document order, after checking that it
    /// is well-formed XML: one root element, tags that nest and match,
    /// quoted attribute values, no raw `<` in text and only the five
    /// predefined entities.
    fn elements(svg: &str) -> Vec<String> {
        let (mut open, mut names, mut rest) = (Vec::new(), Vec::new(), svg);
        while let Some(start) = rest.find('<') {
            check_entities(&rest[..start]);
            let end = rest[start..].find('>').expect("tag ends") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "tag {tag}");
            assert_eq!(tag.matches('"').count() % 2, 0, "quotes in {tag}");
            check_entities(tag);
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop().as_deref(), Some(name), "closing {name}");
            } else {
                assert!(!open.is_empty() || names.is_empty(), "one root");
                let name = tag.split([' ', '/', '\n']).next().unwrap_or_default();
                names.push(name.to_string());
                if !tag.ends_with('/') {
                    open.push(name.to_string());
                }
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "unclosed {open:?}");
        assert!(rest.trim().is_empty(), "text after the root: {rest}");
        names
    }

    /// Every `&` in `text` starts one of XML's predefined entities.
    fn check_entities(text: &str) {
        for (i, _) in text.match_indices('&') {
            let entity = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"];
            let ok = entity.iter().any(|e| text[i..].starts_with(e));
            assert!(ok, "bare & in {text}");
        }
    }

    /// The drawn data of the series named `name`: the group's elements
    /// (`rect`, `circle`, `polyline`) and how many points they hold.
    fn drawn(svg: &str, name: &str) -> (Vec<String>, usize) {
        let start = format!("<g class=\"series\" data-name=\"{name}\"");
        let group = svg.split(&start).nth(1).expect("series group");
        let group = &group[..group.find("</g>").expect("group ends")];
        let inner = &group[group.find('>').expect("tag ends") + 1..];
        let tags: Vec<_> = elements(&format!("<g>{inner}</g>"))[1..].to_vec();
        let points = match inner.split("points=\"").nth(1) {
            Some(p) => p[..p.find('"').unwrap_or(0)].split(' ').count(),
            None => tags.len(),
        };
        (tags, points)
    }

    /// [`Plot::render`] of these.
    fn render_svg(
        [title, x_label, y_label]: [&str; 3],
        series: &[Series],
        (width, height): (u32, u32),
    ) -> io::Result<String> {
        let plot = Plot {
            title,
            x_label,
            y_label,
            series,
            width,
            height,
        };
        plot.render()
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
        let svg = render_svg(["Loss", "step", "loss"], &all, (800, 500)).expect("render");
        let names = elements(&svg);
        assert_eq!(names[0], "svg");
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"800\""));
        assert_eq!(drawn(&svg, "train loss"), (vec!["polyline".into()], 199));
        assert_eq!(drawn(&svg, "eval loss"), (vec!["rect".to_string(); 3], 3));
        assert_eq!(drawn(&svg, "Unused: (none) 5%_/+"), (vec![], 0));
        for (label, swatch) in [("train loss", "#c81e1e"), ("eval loss", "#1e1ec8")] {
            assert!(svg.contains(&format!(">{label}</text>")), "{label}");
            assert!(svg.contains(&format!("fill=\"{swatch}\"/>")), "{label}");
        }
        for text in [">Loss<", ">step<", ">loss<", ">100<", "rotate(-90"] {
            assert!(svg.contains(text), "{text}");
        }
        let lay = layout(&all, 800, 500);
        let (key, plot) = (lay.legend.expect("legend"), lay.plot);
        assert!(key.2 <= plot.2 && key.1 >= plot.1, "legend in plot");
        let grid = svg.split("<g class=\"grid\"").nth(1).expect("grid");
        assert!(
            grid[..grid.find("</g>").expect("end")]
                .matches("<line")
                .count()
                >= 6
        );
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
            for (w, h) in [(64, 64), (300, 90), (800, 500)] {
                let svg = render_svg(["t\u{e9}st ~", "x", "y"], &s, (w, h)).expect("render");
                elements(&svg);
                assert!(!svg.contains("NaN") && !svg.contains("inf"), "case {i}");
                assert_eq!(drawn(&svg, "s").1 > 0, i > 1, "case {i}");
            }
        }
        elements(&render_svg(["no series", "x", "y"], &[], (800, 500)).expect("render"));
    }

    #[test]
    fn labels_are_escaped() {
        let hostile = "<a href='x'>&\"b\"\u{1}</a>";
        let s = [series(hostile, [1, 2, 3], &[(1.0, 2.0)], true)];
        let svg = render_svg([hostile; 3], &s, (800, 500)).expect("render");
        elements(&svg);
        let escaped = "&lt;a href=&apos;x&apos;&gt;&amp;&quot;b&quot; &lt;/a&gt;";
        assert_eq!(svg.matches(escaped).count(), 5, "{svg}");
        assert!(!svg.contains('\u{1}'));
    }

    #[test]
    fn invalid_sizes_error() {
        for (w, h) in [(0, 0), (63, 500), (800, 63), (800, 0), (MAX_DIM + 1, 100)] {
            let err = render_svg(["t", "x", "y"], &[], (w, h)).expect_err("size must be rejected");
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
    fn write_replaces_file_atomically() {
        let dir = tempfile::tempdir().expect("temp dir");
        let dir = dir.path();
        let (path, s) = (dir.join("loss.svg"), [series("a", [9, 9, 9], &[], true)]);
        let plot = |height| Plot {
            title: "t",
            x_label: "x",
            y_label: "y",
            series: &s,
            width: 120,
            height,
        };
        for height in [80, 90] {
            plot(height).write(&path).expect("write");
            let svg = fs::read_to_string(&path).expect("read");
            assert!(svg.contains(&format!(" height=\"{height}\"")), "{svg}");
        }
        let names: Vec<_> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("loss.svg")],
            "no temporary file left"
        );
        assert!(plot(10).write(&dir.join("x.svg")).is_err());
        assert!(!dir.join("x.svg").exists());
    }
}
