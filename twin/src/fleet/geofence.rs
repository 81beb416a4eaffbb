//! Geofences: GeoJSON (RFC 7946) `Polygon` and `MultiPolygon` geometries, or a `Feature` /
//! `FeatureCollection` of them, over the car's last reported position. Positions are
//! `[longitude, latitude]` in degrees (WGS 84), as GeoJSON writes them. A point is inside when it
//! is inside a polygon's outer ring and outside its holes (even-odd rule; a point exactly on an
//! edge may fall either way). Rings are taken as plane polygons in degrees, which is what
//! RFC 7946 asks of them; a ring crossing the antimeridian must be split, as the RFC says.

use serde_json::Value;

/// Bounds on what an operator's geofence may hold (it is stored with the deployment and checked
/// against every car).
pub const MAX_POINTS: usize = 100_000;
pub const MAX_POLYGONS: usize = 1_000;

/// A parsed geofence: polygons, each an outer ring and its holes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Geofence {
    polygons: Vec<Vec<Ring>>,
}

type Ring = Vec<(f64, f64)>;

/// Why a geofence was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("geofence: {0}")]
pub struct GeofenceError(pub String);

fn bad<T>(why: impl Into<String>) -> Result<T, GeofenceError> {
    Err(GeofenceError(why.into()))
}

impl Geofence {
    /// Parse a GeoJSON geometry, feature or feature collection of (multi)polygons.
    pub fn parse(geojson: &Value) -> Result<Self, GeofenceError> {
        let mut fence = Self::default();
        let mut points = 0;
        fence.add(geojson, &mut points, 0)?;
        if fence.polygons.is_empty() {
            return bad("no polygon in it");
        }
        Ok(fence)
    }

    fn add(&mut self, v: &Value, points: &mut usize, depth: u8) -> Result<(), GeofenceError> {
        if depth > 2 {
            return bad("features nest too deep");
        }
        match v["type"].as_str() {
            Some("FeatureCollection") => {
                let Some(features) = v["features"].as_array() else {
                    return bad("a FeatureCollection without `features`");
                };
                for f in features {
                    self.add(f, points, depth + 1)?;
                }
                Ok(())
            }
            Some("Feature") => self.add(&v["geometry"], points, depth + 1),
            Some("Polygon") => {
                let polygon = polygon(&v["coordinates"], points)?;
                self.push(polygon)
            }
            Some("MultiPolygon") => {
                let Some(list) = v["coordinates"].as_array() else {
                    return bad("a MultiPolygon without `coordinates`");
                };
                for p in list {
                    let polygon = polygon(p, points)?;
                    self.push(polygon)?;
                }
                Ok(())
            }
            Some(other) => bad(format!(
                "a {other} is not an area: use Polygon or MultiPolygon (or a Feature of one)"
            )),
            None => bad("not a GeoJSON object (no `type`)"),
        }
    }

    fn push(&mut self, polygon: Vec<Ring>) -> Result<(), GeofenceError> {
        if self.polygons.len() >= MAX_POLYGONS {
            return bad(format!("more than {MAX_POLYGONS} polygons"));
        }
        self.polygons.push(polygon);
        Ok(())
    }

    /// Whether `(longitude, latitude)` is inside.
    pub fn contains(&self, lon: f64, lat: f64) -> bool {
        self.polygons.iter().any(|rings| {
            let mut rings = rings.iter();
            rings.next().is_some_and(|outer| inside(outer, lon, lat))
                && !rings.any(|hole| inside(hole, lon, lat))
        })
    }
}

fn polygon(coordinates: &Value, points: &mut usize) -> Result<Vec<Ring>, GeofenceError> {
    let Some(rings) = coordinates.as_array() else {
        return bad("a Polygon's `coordinates` must be a list of rings");
    };
    if rings.is_empty() {
        return bad("a Polygon without rings");
    }
    rings
        .iter()
        .map(|ring| {
            let Some(positions) = ring.as_array() else {
                return bad("a ring must be a list of positions");
            };
            *points += positions.len();
            if *points > MAX_POINTS {
                return bad(format!("more than {MAX_POINTS} positions"));
            }
            // RFC 7946: four or more positions, the first and the last the same.
            if positions.len() < 4 {
                return bad("a ring needs at least four positions (the first repeated last)");
            }
            let ring = positions
                .iter()
                .map(|p| {
                    let lon = p[0].as_f64().filter(|l| (-180.0..=180.0).contains(l));
                    let lat = p[1].as_f64().filter(|l| (-90.0..=90.0).contains(l));
                    match (lon, lat) {
                        (Some(lon), Some(lat)) => Ok((lon, lat)),
                        _ => bad(format!(
                            "{p} is not a [longitude, latitude] position in degrees"
                        )),
                    }
                })
                .collect::<Result<Ring, _>>()?;
            if ring.first() != ring.last() {
                return bad("a ring must end where it starts");
            }
            Ok(ring)
        })
        .collect()
}

/// Even-odd rule: a ray from the point towards +longitude crosses the ring an odd number of times.
fn inside(ring: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut crossings = false;
    for edge in ring.windows(2) {
        let ((x1, y1), (x2, y2)) = (edge[0], edge[1]);
        if (y1 > y) != (y2 > y) {
            let at = x1 + (y - y1) * (x2 - x1) / (y2 - y1);
            if x < at {
                crossings = !crossings;
            }
        }
    }
    crossings
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Bavaria, roughly, with Munich's centre cut out: a polygon with a hole.
    fn bavaria_without_munich() -> Value {
        json!({"type": "Feature", "properties": {"name": "Bavaria but Munich"}, "geometry": {
            "type": "Polygon",
            "coordinates": [
                [[9.0, 47.3], [13.8, 47.3], [13.8, 50.5], [9.0, 50.5], [9.0, 47.3]],
                [[11.4, 48.05], [11.75, 48.05], [11.75, 48.25], [11.4, 48.25], [11.4, 48.05]]
            ]
        }})
    }

    #[test]
    fn a_point_is_inside_the_outer_ring_and_outside_the_holes() {
        let fence = Geofence::parse(&bavaria_without_munich()).unwrap();
        assert!(fence.contains(10.9, 49.45), "Nuremberg");
        assert!(!fence.contains(11.58, 48.14), "Munich is the hole");
        assert!(!fence.contains(13.4, 52.52), "Berlin");
        assert!(!fence.contains(-0.13, 51.5), "London");
    }

    #[test]
    fn a_concave_ring_and_a_multipolygon() {
        // An L: the notch at the top right is outside.
        let l = json!({"type": "MultiPolygon", "coordinates": [
            [[[0.0, 0.0], [2.0, 0.0], [2.0, 1.0], [1.0, 1.0], [1.0, 2.0], [0.0, 2.0], [0.0, 0.0]]],
            [[[10.0, 10.0], [11.0, 10.0], [11.0, 11.0], [10.0, 11.0], [10.0, 10.0]]]
        ]});
        let fence = Geofence::parse(&l).unwrap();
        assert!(fence.contains(0.5, 1.5));
        assert!(fence.contains(1.5, 0.5));
        assert!(!fence.contains(1.5, 1.5), "the notch");
        assert!(fence.contains(10.5, 10.5), "the second polygon");
        assert!(!fence.contains(5.0, 5.0));
    }

    #[test]
    fn a_feature_collection_is_the_union_of_its_areas() {
        let fc = json!({"type": "FeatureCollection", "features": [
            bavaria_without_munich(),
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
                [[-0.5, 51.3], [0.3, 51.3], [0.3, 51.7], [-0.5, 51.7], [-0.5, 51.3]]]}}
        ]});
        let fence = Geofence::parse(&fc).unwrap();
        assert!(fence.contains(-0.13, 51.5), "London");
        assert!(fence.contains(10.9, 49.45), "Nuremberg");
    }

    #[test]
    fn what_is_not_an_area_is_refused_with_the_reason() {
        for (geojson, why) in [
            (
                json!({"type": "Point", "coordinates": [1.0, 2.0]}),
                "not an area",
            ),
            (json!({"coordinates": []}), "no `type`"),
            (
                json!({"type": "Polygon", "coordinates": []}),
                "without rings",
            ),
            (
                json!({"type": "Polygon", "coordinates": [[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]}),
                "at least four",
            ),
            (
                json!({"type": "Polygon", "coordinates": [[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]]}),
                "end where it starts",
            ),
            (
                json!({"type": "Polygon", "coordinates": [[[0.0, 0.0], [200.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]}),
                "not a [longitude, latitude]",
            ),
            (
                json!({"type": "FeatureCollection", "features": []}),
                "no polygon",
            ),
        ] {
            let e = Geofence::parse(&geojson).unwrap_err();
            assert!(e.0.contains(why), "{geojson}: {e}");
        }
    }
}
