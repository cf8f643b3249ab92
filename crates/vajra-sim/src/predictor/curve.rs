//! Piecewise-linear curves over a measured grid, with sane extrapolation.

/// `y(x)` through measured points: linear between them, the first value below the grid, and
/// proportional growth above it (`y(x) = y(x_max)·x/x_max`, what a compute- or
/// bandwidth-bound operator does once it is large).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    xs: Vec<f64>,
    ys: Vec<f64>,
}

impl Curve {
    /// From points; duplicate `x` values are averaged, order does not matter. `None` if empty
    /// or any value is not finite.
    pub fn new(mut pts: Vec<(f64, f64)>) -> Option<Self> {
        if pts.is_empty() || pts.iter().any(|(x, y)| !x.is_finite() || !y.is_finite()) {
            return None;
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut xs: Vec<f64> = Vec::new();
        let mut ys: Vec<f64> = Vec::new();
        let mut n = 0.0;
        for (x, y) in pts {
            if xs.last() == Some(&x) {
                let last = ys.len() - 1;
                ys[last] = (ys[last] * n + y) / (n + 1.0);
                n += 1.0;
            } else {
                xs.push(x);
                ys.push(y.max(0.0));
                n = 1.0;
            }
        }
        Some(Curve { xs, ys })
    }

    /// Largest measured `x`.
    pub fn x_max(&self) -> f64 {
        self.xs[self.xs.len() - 1]
    }

    /// The value at `x`.
    pub fn at(&self, x: f64) -> f64 {
        let n = self.xs.len();
        if x <= self.xs[0] {
            return self.ys[0];
        }
        if x >= self.xs[n - 1] {
            let xm = self.xs[n - 1];
            return if xm > 0.0 {
                self.ys[n - 1] * x / xm
            } else {
                self.ys[n - 1]
            };
        }
        let i = self.xs.partition_point(|&v| v <= x);
        let (x0, x1, y0, y1) = (self.xs[i - 1], self.xs[i], self.ys[i - 1], self.ys[i]);
        y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    }

    /// The measured points.
    pub fn points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.xs.iter().copied().zip(self.ys.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_clamps_below_and_scales_above() {
        let c = Curve::new(vec![(4.0, 2.0), (1.0, 1.0), (4.0, 4.0)]).unwrap();
        assert_eq!(c.at(0.0), 1.0);
        assert_eq!(c.at(4.0), 3.0, "duplicates averaged");
        assert_eq!(c.at(2.5), 2.0);
        assert_eq!(c.at(8.0), 6.0);
    }

    #[test]
    fn rejects_empty_and_nan() {
        assert!(Curve::new(vec![]).is_none());
        assert!(Curve::new(vec![(1.0, f64::NAN)]).is_none());
    }
}
