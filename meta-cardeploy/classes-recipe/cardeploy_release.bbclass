# Makes the cardeploy release of the RAUC bundle a recipe builds: inherit it after `bundle`.
#
# The release (release.json, sources.json, indexes/) is what `cardeploy release sign` and
# `cardeploy release push` take; it is deployed beside the bundle as
# ${BUNDLE_NAME}.cardeploy/ with the link ${BUNDLE_LINK_NAME}.cardeploy. The bundle's chunk index is
# computed here, with the same chunking the cars use, so the pipeline only signs and pushes.
#
# Signing belongs to the pipeline, with the release key kept out of the build machine:
#   cardeploy release sign tmp/deploy/images/<machine>/<bundle>.cardeploy --key release.key
#   cardeploy release push tmp/deploy/images/<machine>/<bundle>.cardeploy
# A lab build may sign here instead: set CARDEPLOY_RELEASE_KEY to the release key's path.

# The release line: versions are ordered within it, and a car never goes back to a lower one.
CARDEPLOY_RELEASE_LINE ??= "${BPN}"
# Semantic version of the release (x.y.z).
CARDEPLOY_RELEASE_VERSION ??= "${PV}"
CARDEPLOY_RELEASE_KEY ??= ""

do_cardeploy_release[doc] = "Makes the cardeploy release (chunk indexes, release.json) of the bundle"
do_cardeploy_release[depends] += "cardeploy-cli-native:do_populate_sysroot"
do_cardeploy_release[dirs] = "${B}"
do_cardeploy_release[file-checksums] += "${@'${CARDEPLOY_RELEASE_KEY}:False' if d.getVar('CARDEPLOY_RELEASE_KEY') else ''}"

do_cardeploy_release() {
    # `release create` makes the directory itself and refuses an existing one.
    rm -rf ${B}/cardeploy-release
    cardeploy release create \
        --line "${CARDEPLOY_RELEASE_LINE}" \
        --version "${CARDEPLOY_RELEASE_VERSION}" \
        --compatible "${RAUC_BUNDLE_COMPATIBLE}" \
        --os ${B}/bundle.raucb \
        --out ${B}/cardeploy-release
    if [ -n "${CARDEPLOY_RELEASE_KEY}" ]; then
        bbwarn "Signing ${CARDEPLOY_RELEASE_LINE}@${CARDEPLOY_RELEASE_VERSION} in the build with ${CARDEPLOY_RELEASE_KEY}: keep release keys out of build machines outside the lab."
        cardeploy release sign ${B}/cardeploy-release --key "${CARDEPLOY_RELEASE_KEY}"
    fi
}
addtask cardeploy_release after do_bundle before do_deploy

do_deploy:append() {
    rm -rf ${DEPLOYDIR}/${BUNDLE_NAME}.cardeploy
    cp -r ${B}/cardeploy-release ${DEPLOYDIR}/${BUNDLE_NAME}.cardeploy
    ln -sfn ${BUNDLE_NAME}.cardeploy ${DEPLOYDIR}/${BUNDLE_LINK_NAME}.cardeploy
}
