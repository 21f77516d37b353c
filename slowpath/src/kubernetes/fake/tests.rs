//! The fake's own checks: the kubelet's script parsing and the label selectors.

use super::*;

#[test]
fn scripts_and_selectors() {
    let sh = |s: &str| vec!["sh".to_owned(), "-c".to_owned(), s.to_owned()];
    assert_eq!(
        script(&sh("echo hello; sleep 0.5 && exit 3")),
        vec![
            Step::Echo("hello".into()),
            Step::Sleep(Duration::from_millis(500)),
            Step::Exit(3)
        ]
    );
    assert_eq!(script(&["false".to_owned()]), vec![Step::Exit(1)]);
    assert_eq!(
        script(&sh("fake-hold\nfake-evict")),
        vec![Step::Hold, Step::Evict]
    );
    let labels = BTreeMap::from([
        ("a".to_owned(), "1".to_owned()),
        ("b".to_owned(), "2".to_owned()),
    ]);
    assert!(selector_matches("a=1,b", &labels));
    assert!(selector_matches("a==1,!c", &labels));
    assert!(!selector_matches("a!=1", &labels));
    assert!(!selector_matches("c", &labels));
}
