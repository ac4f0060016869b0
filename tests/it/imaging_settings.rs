//! The `[imaging]` settings deserialize with defaults and reject unknown keys.
use her2map::imaging::{ImagingSettings, SideSetting, UsFrameRule, VoiWindowChoice};

#[test]
fn settings_from_config() {
    let s: ImagingSettings = serde_json::from_str(
        r#"{
            "lesion_side": "left",
            "mri_post_contrast_phase": 1,
            "us_frame": {"index": 2},
            "voi_window": "widest",
            "clinical": [{"attribute": "PatientAge", "scale": 0.01}, {"constant": 1.0}, {}, {"attribute": "(0010,1030)"}, {}]
        }"#,
    )
    .unwrap();
    assert_eq!(s.lesion_side, SideSetting::Left);
    assert_eq!(s.mri_post_contrast_phase, 1);
    assert_eq!(s.us_frame, UsFrameRule::Index(2));
    assert_eq!(s.voi_window, VoiWindowChoice::Widest);
    assert_eq!(s.clinical[0].scale, 0.01);
    assert_eq!(s.clinical[1].constant, Some(1.0));
    assert_eq!(s.mri_percentile_high, 99.5, "defaults fill the rest");

    let d: ImagingSettings = serde_json::from_str("{}").unwrap();
    assert_eq!(d.mri_post_contrast_phase, 2);
    assert_eq!(d.lesion_side, SideSetting::Unknown);

    assert!(serde_json::from_str::<ImagingSettings>(r#"{"no_such_key": 1}"#).is_err());
    assert!(
        serde_json::from_str::<ImagingSettings>(
            r#"{"clinical": [{"atribute": "PatientAge"}, {}, {}, {}, {}]}"#
        )
        .is_err()
    );
}
